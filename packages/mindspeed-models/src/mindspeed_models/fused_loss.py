"""The language-model loss through mindspeed_kernels' fused linear cross-entropy.

megatron-core's ``cross_entropy_loss_fusion`` flag (``cross_entropy_fusion_impl="native"``) fuses only
the softmax and the loss: the output layer still writes the full [s, b, V/tp] logits first. Here, a
forward with ``labels`` hands the output layer's input and weight straight to
:func:`mindspeed_kernels.ops.fused_linear_cross_entropy`, which holds the logits of one chunk of tokens
at a time (``LOGITS_CHUNK_BYTES``), for the main LM loss and for each Multi-Token Prediction depth. The
per-token loss [b, s] float32 is what megatron's ``compute_language_model_loss`` returns; a forward
without labels is megatron's, unchanged.

Parallelism is megatron's vocab-parallel output layer reproduced around the kernel:

- TP: this rank's vocabulary shard of the weight, and the TP group as the kernel's ``process_group``.
  The kernel all-reduces the hidden-state gradient itself, which replaces the all-reduce megatron's
  ``ColumnParallelLinear`` puts on its input.
- sequence parallelism: the sequence-sharded hidden states are all-gathered first, like the output
  layer does, but the backward only keeps this rank's slice (no reduce-scatter): the kernel's
  gradient is already summed over the vocabulary shards.
- tied embeddings: the shared word-embedding weight (megatron's ``shared_embedding_or_output_weight``).
- PP: only the last stage (``post_process``) computes a loss, as in megatron.
"""

from __future__ import annotations

import importlib.util

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler, MTPLossLoggingHelper

from mindspeed_kernels.ops import fused_linear_cross_entropy
from mindspeed_models.context_parallel import roll

__all__ = [
    "IGNORE_INDEX",
    "LOGITS_CHUNK_BYTES",
    "MAX_CHUNK_TOKENS",
    "check_fusion_config",
    "chunk_tokens",
    "fusion_enabled",
    "language_model_loss",
    "postprocess",
]

LOGITS_CHUNK_BYTES = 128 * 2**20
"""Budget for one chunk of float32 logits [tokens, V/tp]: the chunk is as many tokens as fit (at least
one, at most MAX_CHUNK_TOKENS), e.g. 1048 tokens for V/tp = 32000, 220 for 152064. The kernel holds
about two such buffers at a time; megatron's unfused path holds all tokens' logits and softmax."""

MAX_CHUNK_TOKENS = 4096

IGNORE_INDEX = -100
"""A label equal to this gets loss 0 and no gradient (megatron itself has no ignore index: use its loss mask)."""


def fusion_enabled(config) -> bool:
    """Whether ``config`` (a megatron TransformerConfig) asks for the fused loss this module provides:
    ``cross_entropy_loss_fusion=True`` with ``cross_entropy_fusion_impl="native"`` (megatron's default)."""
    return bool(getattr(config, "cross_entropy_loss_fusion", False)) and config.cross_entropy_fusion_impl == "native"


def check_fusion_config(config) -> None:
    """ValueError for a fusion setting that cannot run: ``cross_entropy_fusion_impl="te"`` without TransformerEngine
    (megatron would only fail at the first loss, or call its import stub)."""
    if not getattr(config, "cross_entropy_loss_fusion", False) or config.cross_entropy_fusion_impl != "te":
        return
    if importlib.util.find_spec("transformer_engine") is None:
        raise ValueError(
            "cross_entropy_fusion_impl='te' needs TransformerEngine, which is not installed; "
            "use cross_entropy_fusion_impl='native' (mindspeed_kernels' fused linear cross-entropy)"
        )


def postprocess(model, hidden_states: torch.Tensor, input_ids, position_ids, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """Stand-in for ``GPTModel._postprocess`` with labels (same keyword arguments): runs the MTP block on
    its stage, then returns the per-token loss [b, s] float32 on the last stage (the hidden states
    elsewhere, as megatron)."""
    if kwargs.get("mtp_in_postprocess"):
        hidden_states = model.mtp(
            input_ids=input_ids,
            position_ids=position_ids,
            hidden_states=hidden_states,
            attention_mask=kwargs.get("attention_mask"),
            inference_params=kwargs.get("inference_params"),
            rotary_pos_emb=kwargs.get("rotary_pos_emb"),
            rotary_pos_cos=kwargs.get("rotary_pos_cos"),
            rotary_pos_sin=kwargs.get("rotary_pos_sin"),
            packed_seq_params=kwargs.get("packed_seq_params"),
            sequence_len_offset=kwargs.get("sequence_len_offset"),
            embedding=model.embedding,
            **(kwargs.get("extra_block_kwargs") or {}),
        )
    if not model.post_process:
        return hidden_states
    return language_model_loss(
        model, hidden_states, labels, loss_mask=kwargs.get("loss_mask"), packed_seq_params=kwargs.get("packed_seq_params")
    )


def language_model_loss(model, hidden_states: torch.Tensor, labels: torch.Tensor, *, loss_mask=None, packed_seq_params=None):
    """Per-token loss [b, s] float32 of ``model``'s output layer on ``hidden_states``.

    ``hidden_states`` [s, b, h] (sequence-sharded [s/tp, b, h] under sequence parallelism); with MTP
    layers, the main and the MTP depths' states concatenated along s, as megatron's MTP block returns
    them: each depth's loss (masked by the rolled ``loss_mask`` [b, s], default all ones) is attached to
    the gradient exactly as megatron does (``MTPLossAutoScaler``) and logged to its MTP loss tracker.
    ``labels`` [b, s]: vocabulary ids (or ``IGNORE_INDEX``).
    """
    depths = model.config.mtp_num_layers or 0
    if depths:
        parts = torch.chunk(hidden_states, 1 + depths, dim=0)
        hidden_states = _attach_mtp_losses(model, parts, labels, loss_mask, packed_seq_params)
    return _per_token_loss(model, hidden_states, labels)


def _attach_mtp_losses(model, parts, labels, loss_mask, packed_seq_params) -> torch.Tensor:
    """The main hidden states ``parts[0]``, carrying each MTP depth's scaled loss into the backward pass.

    Depth d predicts the labels rolled d steps left; the rolled-in last positions are masked out."""
    config = model.config
    depths = config.mtp_num_layers
    main = parts[0]
    mtp_labels = labels
    mask = torch.ones_like(labels) if loss_mask is None else loss_mask
    scale = config.mtp_loss_scaling_factor / depths
    for depth in range(depths):
        mtp_labels, _ = roll(model, mtp_labels, shifts=-1, dims=-1, cp_group=model.cp_group, packed_seq_params=packed_seq_params)
        mask, num_tokens = roll(model, mask, shifts=-1, dims=-1, cp_group=model.cp_group, packed_seq_params=packed_seq_params)
        loss = mask * _per_token_loss(model, parts[depth + 1], mtp_labels)
        if model.training:
            MTPLossLoggingHelper.save_loss_to_tracker(
                loss.sum() / num_tokens,
                depth,
                depths,
                avg_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
            )
        # calculate_per_token_loss: the trainer divides by the global token count itself.
        weighted = scale * loss if config.calculate_per_token_loss else scale * loss / num_tokens
        main = MTPLossAutoScaler.apply(main, weighted)
    return main


def chunk_tokens(vocab_local: int) -> int:
    """Tokens per logits chunk for a vocabulary shard of ``vocab_local`` rows (see ``LOGITS_CHUNK_BYTES``)."""
    return max(1, min(MAX_CHUNK_TOKENS, LOGITS_CHUNK_BYTES // (4 * vocab_local)))


def _per_token_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[s(/tp), b, h] hidden states and [b, s] labels -> [b, s] float32 loss, never forming the logits."""
    layer = model.output_layer
    tp_group = model.pg_collection.tp
    if layer.sequence_parallel:
        # Backward keeps this rank's slice only: the kernel already sums the gradient over the TP ranks.
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False, group=tp_group)
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else layer.weight
    loss = fused_linear_cross_entropy(
        hidden,
        weight,
        labels.transpose(0, 1),  # [b, s] -> [s, b], like the hidden states
        IGNORE_INDEX,
        reduction="none",
        chunk_size=chunk_tokens(weight.shape[0]),
        process_group=tp_group if tp_group.size() > 1 else None,
    )
    return loss.transpose(0, 1).contiguous()
