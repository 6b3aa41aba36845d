"""Multi-head Latent Attention (DeepSeek-V2/V3) on megatron-core's ``MLASelfAttention``, local layers.

What is here:

- :func:`mla_self_attention_spec`: a ``ModuleSpec`` for megatron's ``MLASelfAttention`` (as
  :class:`MLASelfAttentionLocal`, which fixes the TP > 1 gradient of the rope key) with local
  (non-TransformerEngine) ``ColumnParallelLinear``/``RowParallelLinear`` projections, our
  :class:`~mindspeed_models.layers.RMSNorm` as ``q_layernorm``/``kv_layernorm`` and
  :class:`MLAFlashAttention` as core attention. Parameter names are megatron's
  (``linear_q_proj`` or ``linear_q_down_proj``/``q_layernorm``/``linear_q_up_proj``,
  ``linear_kv_down_proj`` = [kv_lora_rank | qk_pos_emb_head_dim] rows, ``kv_layernorm``,
  ``linear_kv_up_proj``, ``linear_proj``), which mindspeed_ckpt's DeepSeek maps target.
- :func:`mla_layer_spec`: any ``TransformerLayer`` spec (dense or MoE) with its self-attention
  swapped for the MLA one.
- :func:`mla_config_fields`: DeepSeek HF config keys -> ``MLATransformerConfig`` kwargs.

megatron's MLA computes q/k/v itself (latent down/up projections, RoPE on the
``qk_pos_emb_head_dim`` slice with the interleaved-to-halves permutation, YaRN included — the
rotation itself through mindspeed_kernels, see :mod:`mindspeed_models.mla_rope`) and hands
core attention query/key [S, B, N, qk_head_dim + qk_pos_emb_head_dim] and value [S, B, N, v_head_dim]
plus a softmax scale that already contains YaRN's ``mscale(factor, mscale_all_dim) ** 2``.

Seed options (MindSpeed's MLA section), all numerically neutral:

- ``padded_base_length`` (default 128): implemented. q/k head dims are zero-padded to a multiple
  of it before flash attention (zeros add nothing to q.k); the scale stays the unpadded one.
- ``mla_fa_without_pad`` (default False): implemented. False pads v's head dim up to q/k's padded
  head dim and slices the output back; True leaves v at ``v_head_dim`` (our kernel accepts it).
- ``mla_mm_split`` (default False): only the default is accepted. Splitting the two up-projection
  matmuls into four would mean re-implementing megatron's ``get_query_key_value_tensors``; True
  raises ValueError.

TP note: megatron-core 0.16.1's MLA, given a column-parallel ``linear_kv_down_proj`` (its own local
spec), returns wrong gradients at TP > 1 (the shared rope key's per-rank partial gradients are
split, not summed; forward is exact). :class:`MLASelfAttentionLocal` fixes it with
:class:`LatentKVDownProjection`; tests/test_mla.py checks TP=2 (with and without sequence
parallelism) against HF gradients.

CPU note: with transformer_engine absent, megatron's ``extensions.transformer_engine`` import is
mocked, so ``multi_latent_attention.HAVE_TE`` is True while ``TELinear`` is a MagicMock, and
``isinstance(linear_proj, TELinear)`` raises TypeError. :func:`mla_self_attention_spec` resets
``HAVE_TE`` to False in that case (idempotent, only when TELinear is not a class). The adaptor is the
proper home for this seam; see :func:`disable_mocked_te`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer import multi_latent_attention as _mla
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from mindspeed_models import mla_rope
from mindspeed_models.attention import FlashAttention
from mindspeed_models.layers import RMSNorm

__all__ = [
    "LatentKVDownProjection",
    "MLAFlashAttention",
    "MLASelfAttentionLocal",
    "disable_mocked_te",
    "mla_config_fields",
    "mla_layer_spec",
    "mla_self_attention_spec",
]


class MLAFlashAttention(FlashAttention):
    """Core attention for megatron's MLA: q/k head dim ``k_channels``, v head dim ``v_channels``.

    megatron's base ``Attention`` first builds core attention without the channel arguments and
    MLA then rebuilds it with them; with ``None`` the head dims are taken from the tensors.

    ``forward(query, key, value, attention_mask, ...)``: query [Sq, B, N, k_channels], key
    [Skv, B, N, k_channels], value [Skv, B, N, v_channels] -> [Sq, B, N * v_channels] (packed THD:
    [T, N, D] -> [T, N * v_channels]). Masks and windows as :class:`FlashAttention`.
    ``padded_base_length``/``mla_fa_without_pad``: see the module docstring (numerically neutral).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        padded_base_length: int = 128,
        mla_fa_without_pad: bool = False,
    ) -> None:
        super().__init__(
            config, layer_number, attn_mask_type, attention_type, attention_dropout, softmax_scale, cp_comm_type, pg_collection
        )
        if not isinstance(padded_base_length, int) or padded_base_length < 1:
            raise ValueError(f"MLAFlashAttention: padded_base_length={padded_base_length!r}; use a positive int (1 = no padding)")
        self.k_channels = k_channels
        self.v_channels = v_channels
        self.padded_base_length = padded_base_length
        self.mla_fa_without_pad = bool(mla_fa_without_pad)

    def _attend(self, q, k, v, attention_mask, mask_type, scale, dropout, packed) -> torch.Tensor:
        # The scale arrives computed from the unpadded head dim (FlashAttention.forward), so padding
        # below leaves it alone.
        dk, dv = q.shape[-1], v.shape[-1]
        if k.shape[-1] != dk or (self.k_channels, self.v_channels) not in ((None, None), (dk, dv)):
            raise ValueError(
                f"MLAFlashAttention: got q/k/v head dims {dk}/{k.shape[-1]}/{dv}; "
                f"expected {self.k_channels}/{self.k_channels}/{self.v_channels}"
            )
        padded = -(-dk // self.padded_base_length) * self.padded_base_length
        if padded != dk:
            q, k = F.pad(q, (0, padded - dk)), F.pad(k, (0, padded - dk))
        v_padded = dv if self.mla_fa_without_pad else max(padded, dv)
        if v_padded != dv:
            v = F.pad(v, (0, v_padded - dv))
        out = super()._attend(q, k, v, attention_mask, mask_type, scale, dropout, packed)
        if v_padded == dv:
            return out
        # [..., N * v_padded] -> keep each head's first dv channels
        heads = q.shape[-2]
        out = out.unflatten(-1, (heads, v_padded))[..., :dv]
        return out.flatten(-2)


class _GatherLatentAndRope(torch.autograd.Function):
    """All-gather the last dim over TP; backward sums the rope columns' gradient over TP, then splits.

    Why: every TP rank uses the whole gathered [kv_lora | rope] row, but the shared rope key only
    for its own heads, so its gradient is partial per rank; the latent part reaches here already
    summed (linear_kv_up_proj's input all-reduce), identical on every rank.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, rope_dim: int) -> torch.Tensor:
        ctx.group, ctx.rope_dim = group, rope_dim
        return gather_from_tensor_model_parallel_region(local.detach(), group=group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        rope = grad[..., -ctx.rope_dim :].contiguous()
        dist.all_reduce(rope, group=ctx.group)
        grad[..., -ctx.rope_dim :] = rope
        rank, size = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(size, dim=-1)[rank].contiguous(), None, None


class LatentKVDownProjection(ColumnParallelLinear):
    """``linear_kv_down_proj`` that returns its whole [kv_lora_rank | qk_pos_emb_head_dim] output on every rank.

    Same parameters (and TP sharding, so checkpoints are unchanged) as ``ColumnParallelLinear``;
    ``forward(x)`` -> ([S, B, kv_lora_rank + rope], None), or [S / TP, B, ...] under sequence
    parallelism (the layout megatron's MLA expects from a duplicated down projection).

    Why: megatron-core 0.16.1's MLA gathers a sharded down projection itself and then splits the
    gradient back without summing the rope key's per-rank partial gradients, so at TP > 1 the
    ``linear_kv_down_proj`` rope rows and the input gradient come out wrong (forward is exact).
    Returning the full output makes MLA skip its own gather; the gather here sums them.
    """

    def forward(self, input_, weight=None, runtime_gather_output=None):
        local, bias = super().forward(input_, weight, runtime_gather_output=False)
        if self.tp_group.size() == 1:
            return local, bias
        if self.sequence_parallel:
            # Downstream, MLA all-gathers k_pos_emb and kv_up all-gathers the latent along the
            # sequence: their backward reduce-scatters already sum over TP, so a plain gather is right.
            full = gather_from_tensor_model_parallel_region(local, group=self.tp_group)
            return scatter_to_sequence_parallel_region(full, group=self.tp_group), bias
        return _GatherLatentAndRope.apply(local, self.tp_group, self.config.qk_pos_emb_head_dim), bias


class MLASelfAttentionLocal(MLASelfAttention):
    """megatron's ``MLASelfAttention`` with a TP-correct ``linear_kv_down_proj`` (:class:`LatentKVDownProjection`).

    Same constructor, forward, parameters and names. megatron accepts only a fixed list of
    down-projection classes (compared by equality, so no subclass), hence the spec names
    ``ColumnParallelLinear`` and the built module's class is narrowed here; the subclass only
    overrides ``forward``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if type(self.linear_kv_down_proj) is ColumnParallelLinear:
            self.linear_kv_down_proj.__class__ = LatentKVDownProjection


def disable_mocked_te() -> None:
    """Set ``multi_latent_attention.HAVE_TE = False`` when its ``TELinear`` is not a real class.

    Why: megatron's mocked transformer_engine import leaves ``HAVE_TE`` True with a MagicMock
    ``TELinear``, and MLA's ``isinstance(self.linear_proj, TELinear)`` then raises TypeError.
    Idempotent; a real TransformerEngine install (TELinear a class) is left untouched.
    """
    if _mla.HAVE_TE and not isinstance(_mla.TELinear, type):
        _mla.HAVE_TE = False


def mla_self_attention_spec(
    *,
    padded_base_length: int = 128,
    mla_fa_without_pad: bool = False,
    mla_mm_split: bool = False,
) -> ModuleSpec:
    """Spec for a causal ``MLASelfAttention`` (:class:`MLASelfAttentionLocal`) with local linears,
    RMSNorm latent norms and :class:`MLAFlashAttention`.

    Works for both q layouts: megatron builds ``linear_q_proj`` when ``config.q_lora_rank`` is None,
    else ``linear_q_down_proj``/``q_layernorm``/``linear_q_up_proj``. Build it with an
    ``MLATransformerConfig`` (see :func:`mla_config_fields`).
    """
    if mla_mm_split:
        raise ValueError("mla_self_attention_spec: mla_mm_split=True is not implemented (numerically neutral); leave it False")
    disable_mocked_te()
    mla_rope.install()  # MLA's rope channels rotated by mindspeed_kernels (see mla_rope)
    return ModuleSpec(
        module=MLASelfAttentionLocal,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=ColumnParallelLinear,
            linear_q_down_proj=ColumnParallelLinear,
            linear_q_up_proj=ColumnParallelLinear,
            linear_kv_down_proj=ColumnParallelLinear,
            linear_kv_up_proj=ColumnParallelLinear,
            core_attention=ModuleSpec(
                module=MLAFlashAttention,
                params={"padded_base_length": padded_base_length, "mla_fa_without_pad": mla_fa_without_pad},
            ),
            linear_proj=RowParallelLinear,
            q_layernorm=RMSNorm,
            kv_layernorm=RMSNorm,
        ),
    )


def mla_layer_spec(layer_spec: ModuleSpec, **options: Any) -> ModuleSpec:
    """``layer_spec`` (a ``TransformerLayer`` spec, dense or MoE) with self-attention replaced by MLA.

    ``options`` go to :func:`mla_self_attention_spec`. The input spec is not modified.
    """
    submodules = getattr(layer_spec, "submodules", None)
    if submodules is None or not hasattr(submodules, "self_attention"):
        raise TypeError("mla_layer_spec: layer_spec must be a TransformerLayer ModuleSpec with submodules.self_attention")
    new_sub = dataclasses.replace(submodules, self_attention=mla_self_attention_spec(**options))
    return dataclasses.replace(layer_spec, submodules=new_sub)


# ---------------------------------------------------------------------------------------------
# HF config -> MLATransformerConfig kwargs
# ---------------------------------------------------------------------------------------------

_YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}


def _positive_int(cfg: Mapping[str, Any], key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"hf_config[{key!r}]={value!r}; expected a positive int")
    return value


def _rope_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The rope dict under either name (config.json's ``rope_scaling``, transformers 5's ``rope_parameters``)."""
    params = cfg.get("rope_scaling")
    if params is None:
        params = cfg.get("rope_parameters")
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ValueError(f"hf_config['rope_scaling']={params!r}; expected a dict or None")
    return dict(params)


def _rope_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    params = _rope_params(cfg)
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"hf_config['rope_theta']={theta!r}; expected a positive number")
    kind = params.get("rope_type", params.get("type", "default"))
    # Plain RoPE: factor 1 makes megatron's softmax mscale exactly 1, as HF's.
    fields: dict[str, Any] = {
        "rotary_base": float(theta),
        "rope_type": "rope",
        "rotary_scaling_factor": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.0,
    }
    if kind == "default":
        return fields
    if kind != "yarn":
        raise ValueError(f"hf_config['rope_scaling'] type {kind!r} is not supported for MLA; use 'yarn' or none")
    factor = params.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1:
        raise ValueError(f"hf_config['rope_scaling']['factor']={factor!r}; expected a number >= 1")
    original = params.get("original_max_position_embeddings")
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        raise ValueError(f"hf_config['rope_scaling']['original_max_position_embeddings']={original!r}; yarn needs a positive int")
    if params.get("truncate", True) is not True or params.get("attention_factor") is not None:
        raise ValueError("hf_config['rope_scaling']: 'truncate'=False / 'attention_factor' are not supported; remove them")
    fields.update(rope_type="yarn", rotary_scaling_factor=float(factor), original_max_position_embeddings=original)
    for key, default in _YARN_DEFAULTS.items():
        value = params.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, (int, float)):
            raise ValueError(f"hf_config['rope_scaling'][{key!r}]={value!r}; expected a number")
        fields[key] = float(value)
    return fields


def mla_config_fields(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """``MLATransformerConfig`` kwargs for a DeepSeek-V2/V3 HF config dict (``config.json`` contents).

    Maps q_lora_rank (None -> no q compression: ``linear_q_proj``), kv_lora_rank,
    qk_nope_head_dim -> qk_head_dim, qk_rope_head_dim -> qk_pos_emb_head_dim, v_head_dim,
    rope_theta -> rotary_base and rope_scaling (none/default, or yarn with factor, beta_fast,
    beta_slow, mscale, mscale_all_dim, original_max_position_embeddings). Raises ValueError with a
    one-line message for unsupported values (non-interleaved rope, attention_bias, other rope types).
    """
    if not isinstance(hf_config, Mapping):
        raise TypeError(f"mla_config_fields: hf_config must be a dict, got {type(hf_config).__name__}")
    if hf_config.get("rope_interleave", True) is not True:
        raise ValueError("hf_config['rope_interleave']=False is not supported: megatron's MLA RoPE assumes interleaved weights")
    if hf_config.get("attention_bias", False):
        raise ValueError("hf_config['attention_bias']=True is not supported by megatron's MLA; it must be False")
    max_pos = hf_config.get("max_position_embeddings")
    if max_pos is not None:
        _positive_int(hf_config, "max_position_embeddings")
    q_lora = hf_config.get("q_lora_rank")
    fields: dict[str, Any] = {
        "multi_latent_attention": True,
        "q_lora_rank": None if q_lora is None else _positive_int(hf_config, "q_lora_rank"),
        "kv_lora_rank": _positive_int(hf_config, "kv_lora_rank"),
        "qk_head_dim": _positive_int(hf_config, "qk_nope_head_dim"),
        "qk_pos_emb_head_dim": _positive_int(hf_config, "qk_rope_head_dim"),
        "v_head_dim": _positive_int(hf_config, "v_head_dim"),
        "rotary_percent": 1.0,
    }
    if fields["qk_pos_emb_head_dim"] % 2:
        raise ValueError(f"hf_config['qk_rope_head_dim']={fields['qk_pos_emb_head_dim']}; RoPE needs an even head dim")
    fields.update(_rope_fields(hf_config))
    return fields
