"""MLA's rotary embedding through :func:`mindspeed_kernels.ops.rotary_pos_emb`.

megatron's ``MLASelfAttention`` rotates the ``qk_pos_emb_head_dim`` slice of q and k inside its
``get_query_key_value_tensors`` by calling the module-level ``apply_rotary_pos_emb`` of
``megatron.core.transformer.multi_latent_attention``. :func:`install` points that one name at
:func:`apply_mla_rope` (the original stays reachable as ``ORIGINAL``), which computes the same
rotation — de-interleave the rope channels as stored in DeepSeek checkpoints, rotate-half with
cos/sin times YaRN's ``mscale`` — with the kernels' op (``npu_rotary_mul`` on Ascend, float32
math for half inputs). Packed (THD) sequences, fused-RoPE configs and non-MLA callers keep
megatron's implementation. The module holds no state beyond that one rebinding.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import multi_latent_attention as _mla

from mindspeed_kernels import ops

__all__ = ["ORIGINAL", "apply_mla_rope", "install"]

ORIGINAL = _mla.apply_rotary_pos_emb
"""megatron's ``apply_rotary_pos_emb`` as imported by ``multi_latent_attention`` (the fallback)."""


def apply_mla_rope(t: torch.Tensor, freqs: torch.Tensor, config, cu_seqlens=None, mscale: float = 1.0, cp_group=None):
    """megatron's ``apply_rotary_pos_emb(t [S, B, N, R(+pass)], freqs [S, 1, 1, R], config, ...)`` for MLA.

    Returns ``t``'s shape and dtype: the first R channels de-interleaved (``(x0, x2, .., x1, x3, ..)``)
    and rotated by ``freqs`` (rotate-half) with cos/sin scaled by ``mscale``; the rest unchanged.
    """
    if cu_seqlens is not None or config.apply_rope_fusion or config.rotary_interleaved or not config.multi_latent_attention:
        return ORIGINAL(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale, cp_group=cp_group)
    rot = freqs.shape[-1]
    x, rest = t[..., :rot], t[..., rot:]
    x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
    out = ops.rotary_pos_emb(x, torch.cos(freqs) * mscale, torch.sin(freqs) * mscale)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def install() -> None:
    """Route megatron MLA's rotary embedding through :func:`apply_mla_rope` (idempotent)."""
    _mla.apply_rotary_pos_emb = apply_mla_rope
