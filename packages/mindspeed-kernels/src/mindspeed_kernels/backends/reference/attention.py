"""Reference flash attention: pure torch, block by block, O(sequence) memory.

On CPU, a call that :func:`cpu_flash_fits` runs torch's own fused CPU flash kernel instead
(``aten::_scaled_dot_product_flash_attention_for_cpu``, which returns the log-sum-exp; see
:mod:`mindspeed_kernels.backends._torch_sdpa`): float32, bfloat16 or float16, equal q/k/v head
dims, no dropout (the kernel has none), and a mask its ``is_causal`` flag expresses exactly (no
``atten_mask``, no ALiBi, not TND; mode 0 without a band, or modes 2/3 with Sq == Skv). It computes
the same formula in the same precision (float32 accumulation), 1.7-4x faster. Everything
else, float64 included, runs :func:`blockwise_attention`, the ground truth.

The layout tensors are viewed as [B, N, S, D] problems (TND: one B=1 problem per packed
sequence) and handed to :mod:`._flash_blocks`, which never builds a whole [Sq, Skv] score
matrix. A custom autograd Function saves q, k, v, out and lse and recomputes the probabilities
block by block in backward. See :func:`mindspeed_kernels.ops.flash_attention` for the semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from mindspeed_kernels._layouts import lse_bns, to_bnsd
from mindspeed_kernels.backends._torch_sdpa import attention_with_lse, call_dims, mask_fits
from mindspeed_kernels.backends.reference import _flash_blocks as blocks
from mindspeed_kernels.ops.attention import NO_LIMIT

_INF = float("inf")
CPU_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class _Config:
    """The non-differentiable arguments of one call, fixed at forward time (block limits included,
    so backward replays the same blocks and dropout masks even if the module constants change)."""

    layout: str
    n_q: int
    n_kv: int
    sparse_mode: int
    pre_tokens: int
    next_tokens: int
    scale: float
    dropout_p: float
    seed: int
    q_ends: tuple[int, ...] | None
    kv_ends: tuple[int, ...] | None
    mask: torch.Tensor | None
    slopes: torch.Tensor | None
    dtype: torch.dtype
    limits: tuple[int, int, int]


def _band(cfg: _Config, s_q: int, s_kv: int) -> blocks.Band | None:
    delta, mode = s_kv - s_q, cfg.sparse_mode
    if mode == 1:
        return None
    if mode in (2, 3):
        return blocks.Band(delta if mode == 3 else 0, -_INF, 0)
    return blocks.Band(delta if mode == 4 else 0, -cfg.pre_tokens, cfg.next_tokens)


def _spec(cfg: _Config, stream: int, shape: tuple[int, int, int, int], mask, slopes) -> blocks.Spec:
    """The block spec of one problem of ``shape`` = (B, Nq, Sq, Skv)."""
    b, n_q, s_q, s_kv = shape
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(b, n_q, s_q, s_kv)
    if slopes is not None:
        slopes = slopes.to(cfg.dtype).reshape(-1, n_q)
    bq, bk = blocks.block_sizes(b * n_q, s_q, s_kv, cfg.limits)
    return blocks.Spec(
        dtype=cfg.dtype, scale=cfg.scale, band=_band(cfg, s_q, s_kv), mask=mask, slopes=slopes, delta=s_kv - s_q,
        dropout_p=cfg.dropout_p, seed=cfg.seed, stream=stream, block_q=bq, block_kv=bk,
    )


def _problems(cfg: _Config, q_like: list, kv_like: list, lse_like: list):
    """Yield (spec, q-like, kv-like, lse-like [B, N, S] views) per problem; None entries stay None."""
    lay = cfg.layout
    views = lambda xs, n, sl: [None if x is None else to_bnsd(x[sl], lay, n) for x in xs]
    if lay != "TND":
        q4, k4 = views(q_like, cfg.n_q, slice(None)), views(kv_like, cfg.n_kv, slice(None))
        shape = (q4[0].shape[0], cfg.n_q, q4[0].shape[2], k4[0].shape[2])
        yield _spec(cfg, 0, shape, cfg.mask, cfg.slopes), q4, k4, lse_like
        return
    starts_q, starts_kv = (0, *cfg.q_ends[:-1]), (0, *cfg.kv_ends[:-1])
    for idx, (q0, q1, k0, k1) in enumerate(zip(starts_q, cfg.q_ends, starts_kv, cfg.kv_ends, strict=True)):
        mask = None if cfg.mask is None else cfg.mask[: q1 - q0, : k1 - k0]
        slopes = cfg.slopes if cfg.slopes is None or cfg.slopes.dim() == 1 else cfg.slopes[idx]
        spec = _spec(cfg, idx, (1, cfg.n_q, q1 - q0, k1 - k0), mask, slopes)
        lse = [None if x is None else lse_bns(x[q0:q1], lay) for x in lse_like]
        yield spec, views(q_like, cfg.n_q, slice(q0, q1)), views(kv_like, cfg.n_kv, slice(k0, k1)), lse


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cfg: _Config):
        d_v = v.shape[-1] // cfg.n_kv if cfg.layout in ("SBH", "BSH") else v.shape[-1]
        out_last = (cfg.n_q * d_v,) if cfg.layout in ("SBH", "BSH") else (d_v,)
        out = q.new_empty(q.shape[:-1] + out_last)
        if cfg.layout == "TND":
            lse = q.new_empty((q.shape[0], cfg.n_q), dtype=cfg.dtype)
        else:
            lse = q.new_empty(to_bnsd(q, cfg.layout, cfg.n_q).shape[:3], dtype=cfg.dtype)
        for spec, (q4, o4), (k4, v4), (l3,) in _problems(cfg, [q, out], [k, v], [lse]):
            blocks.forward(spec, q4, k4, v4, o4, l3)
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        cfg = ctx.cfg
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout
        dq, dk, dv = (torch.zeros(x.shape, dtype=cfg.dtype, device=x.device) for x in (q, k, v))
        for spec, (q4, o4, do4, dq4), (k4, v4, dk4, dv4), (l3, dl3) in _problems(
            cfg, [q, out, dout, dq], [k, v, dk, dv], [lse, dlse]
        ):
            blocks.backward(spec, q4, k4, v4, o4, l3, do4, dl3, dq4, dk4, dv4)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _heads(q, k, layout: str, num_heads: int | None) -> tuple[int, int, int]:
    """(Nq, Nkv, D) of validated inputs."""
    if layout in ("SBH", "BSH"):
        d = q.shape[-1] // num_heads
        return num_heads, k.shape[-1] // d, d
    axis = 2 if layout == "BSND" else 1
    return q.shape[axis], k.shape[axis], q.shape[-1]


def cpu_flash_fits(*, device_type: str, dtype: torch.dtype, layout: str, sparse_mode: int, has_mask: bool,
                   has_alibi: bool, pre_tokens: int, next_tokens: int, s_q: int, s_kv: int, d_qk: int, d_v: int,
                   dropout_p: float) -> bool:
    """Whether torch's CPU flash kernel computes exactly this call (see the module docstring)."""
    if device_type != "cpu" or dtype not in CPU_FLASH_DTYPES or dropout_p != 0 or d_qk != d_v:
        return False
    return mask_fits(layout=layout, sparse_mode=sparse_mode, has_mask=has_mask, has_alibi=has_alibi,
                     pre_tokens=pre_tokens, next_tokens=next_tokens, s_q=s_q, s_kv=s_kv)


def flash_attention(
    q, k, v, layout="BNSD", sparse_mode=0, pre_tokens=NO_LIMIT, next_tokens=NO_LIMIT, *, atten_mask=None,
    scale=None, dropout_p=0.0, actual_seq_qlen=None, actual_seq_kvlen=None, num_heads=None, alibi_slopes=None,
):
    """Reference implementation of :func:`mindspeed_kernels.ops.flash_attention` (arguments validated there):
    torch's CPU flash kernel where :func:`cpu_flash_fits`, else :func:`blockwise_attention`."""
    dims = call_dims(q, k, v, layout, num_heads)
    fits = cpu_flash_fits(
        device_type=q.device.type, dtype=q.dtype, layout=layout, sparse_mode=sparse_mode,
        has_mask=atten_mask is not None, has_alibi=alibi_slopes is not None, pre_tokens=pre_tokens,
        next_tokens=next_tokens, s_q=dims["s_q"], s_kv=dims["s_kv"], d_qk=dims["d_qk"], d_v=dims["d_v"],
        dropout_p=dropout_p,
    )
    if fits:
        scale = float(dims["d_qk"] ** -0.5 if scale is None else scale)
        return attention_with_lse("flash_cpu", q, k, v, layout, dims["n_q"], sparse_mode != 0, scale, 0.0)
    return blockwise_attention(
        q, k, v, layout, sparse_mode, pre_tokens, next_tokens, atten_mask=atten_mask, scale=scale,
        dropout_p=dropout_p, actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
        num_heads=num_heads, alibi_slopes=alibi_slopes,
    )


def blockwise_attention(
    q, k, v, layout="BNSD", sparse_mode=0, pre_tokens=NO_LIMIT, next_tokens=NO_LIMIT, *, atten_mask=None,
    scale=None, dropout_p=0.0, actual_seq_qlen=None, actual_seq_kvlen=None, num_heads=None, alibi_slopes=None,
):
    """The block-by-block implementation of :func:`mindspeed_kernels.ops.flash_attention`, every call (the ground truth)."""
    n_q, n_kv, d = _heads(q, k, layout, num_heads)
    dropout_p = float(dropout_p)
    # one draw from the default generator of q's device: torch.manual_seed makes dropout reproducible
    seed = int(torch.randint(0, 2**62, (1,), device=q.device).item()) if dropout_p > 0 else 0
    cfg = _Config(
        layout=layout, n_q=n_q, n_kv=n_kv, sparse_mode=sparse_mode, pre_tokens=pre_tokens, next_tokens=next_tokens,
        scale=float(d**-0.5 if scale is None else scale), dropout_p=dropout_p, seed=seed,
        q_ends=None if actual_seq_qlen is None else tuple(int(x) for x in actual_seq_qlen),
        kv_ends=None if actual_seq_kvlen is None else tuple(int(x) for x in actual_seq_kvlen),
        mask=atten_mask, slopes=alibi_slopes, dtype=torch.promote_types(q.dtype, torch.float32),
        limits=(blocks.BLOCK_Q, blocks.BLOCK_KV, blocks.BLOCK_ELEMENTS),
    )
    return _FlashAttention.apply(q, k, v, cfg)
