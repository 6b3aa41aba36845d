"""Build a megatron-core GPTModel from a :class:`~mindspeed_models.config.ModelSpec`, and read its logits."""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank

from mindspeed_models import adaptor, fused_loss, runtime
from mindspeed_models.config import ModelSpec
from mindspeed_models.layers import param_device
from mindspeed_models.rope import RotaryAngles
from mindspeed_models.spec import block_submodules, mtp_block_spec

__all__ = ["FusedLossGPTModel", "MTPGPTModel", "build_model", "logits"]


class FusedLossGPTModel(GPTModel):
    """megatron's ``GPTModel``; with ``config.cross_entropy_loss_fusion`` (impl ``"native"``) a forward with
    ``labels`` computes its per-token loss [B, S] (main and MTP) with mindspeed_kernels' fused linear
    cross-entropy, never forming the logits (:mod:`mindspeed_models.fused_loss`). Otherwise unchanged."""

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, **kwargs):
        if labels is None or kwargs.get("inference_context") is not None or not fused_loss.fusion_enabled(self.config):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, **kwargs)
        return fused_loss.postprocess(self, hidden_states, input_ids, position_ids, labels, **kwargs)


class MTPGPTModel(FusedLossGPTModel):
    """:class:`FusedLossGPTModel` with MTP layers; without ``labels`` they are skipped.

    With labels, megatron's forward adds the MTP loss (``mtp_loss_scaling_factor`` / ``mtp_num_layers``
    times the mean LM loss of each MTP depth) to the gradient and returns the main per-token losses.
    Without labels megatron 0.16 still runs the MTP layers and then fails on ``labels.clone()``; the
    MTP heads predict later tokens and never change the next-token logits, so this class returns
    those logits directly (``[B, S, V]``, as GPTModel).
    """

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, **kwargs):
        if labels is not None or not self.mtp_process or not self.post_process or kwargs.get("inference_context"):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, **kwargs)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        out, _ = self.output_layer(hidden_states, weight=weight, runtime_gather_output=kwargs.get("runtime_gather_output"))
        return out.transpose(0, 1).contiguous()


def build_model(spec: ModelSpec, *, pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None) -> GPTModel:
    """A megatron-core ``GPTModel`` for ``spec`` on this rank's pipeline stage.

    ``pre_process``/``post_process``: whether this stage holds the embedding / the final norm
    and output layer (both on a single stage). Parameters are initialised per
    ``spec.config`` (``perform_initialization=False`` skips it, e.g. before loading weights).
    Sets up a world-size-1 process group and megatron's parallel state when none exists
    (:func:`mindspeed_models.runtime.ensure_parallel_state`). The model carries ``spec`` as
    ``model.mindspeed_spec``.
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"build_model: spec must be a ModelSpec (from from_hf_config), got {type(spec).__name__}")
    adaptor.install()
    runtime.ensure_parallel_state()
    config = spec.config
    fused_loss.check_fusion_config(config)
    on_rank = post_process and mtp_on_this_rank(config, ignore_virtual=False, vp_stage=vp_stage)
    mtp = mtp_block_spec(spec.layer_specs, config) if on_rank else None
    model = (FusedLossGPTModel if mtp is None else MTPGPTModel)(
        config=config,
        transformer_layer_spec=block_submodules(spec.layer_specs, config, vp_stage),
        vocab_size=spec.padded_vocab_size,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope.base,
        vp_stage=vp_stage,
        mtp_block_spec=mtp,
    )
    # GPTModel builds megatron's RotaryEmbedding, which knows only plain and a fixed Llama-3
    # scaling; ours reproduces the HF config's frequencies (the module holds no parameters).
    model.rotary_pos_emb = RotaryAngles(spec.rope, cp_group=model.pg_collection.cp, device=param_device(config))
    model.mindspeed_spec = spec
    return model


def logits(model: GPTModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits ``[B, S, V]`` float32 for ``input_ids`` [B, S] (integer token ids).

    ``attention_mask`` [B, S] (1/True = token, 0/False = padding, as in transformers) hides the
    padding keys; positions are 0 .. S-1 in every row (as transformers' forward without
    ``position_ids``), so right padding leaves the real tokens' logits unchanged. V is the HF
    vocabulary (padding rows cut) for models from :func:`build_model`, else ``model.vocab_size``.
    Needs the whole model on this rank (``pre_process`` and ``post_process``); runs in the
    model's current mode and autograd state.
    """
    if not (model.pre_process and model.post_process):
        raise ValueError("logits: the model must hold the embedding and the output layer (pre_process and post_process)")
    device = next(model.parameters()).device
    ids = _check_ids(input_ids).to(device)
    batch, seq = ids.shape
    positions = torch.arange(seq, device=device).expand(batch, seq)
    mask = None if attention_mask is None else _megatron_mask(attention_mask, ids.shape, device)
    out = model(ids, positions, mask, runtime_gather_output=True)
    spec = getattr(model, "mindspeed_spec", None)
    vocab = spec.vocab_size if spec is not None else model.vocab_size
    return out[..., :vocab].float()


def _check_ids(input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids [B, S], got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids of shape [B, S], got {input_ids.dtype} {tuple(input_ids.shape)}")
    return input_ids.long()


def _megatron_mask(attention_mask, shape: torch.Size, device) -> torch.Tensor:
    """HF [B, S] keep-mask -> megatron [B, 1, S, S] bool, True = hidden (padding keys and future keys)."""
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(shape):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a [B, S] tensor like input_ids {tuple(shape)}, got {got}")
    keep = attention_mask.to(device).bool()
    seq = shape[1]
    future = torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1)
    return (~keep)[:, None, None, :] | future
