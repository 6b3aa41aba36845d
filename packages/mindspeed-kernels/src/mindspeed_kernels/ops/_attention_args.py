"""Argument checks for :mod:`mindspeed_kernels.ops.attention` (kept apart so the op file stays readable).

Every check raises ``ValueError``/``TypeError`` with one line naming the argument, the bad value
and what to pass instead; backends then trust their arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LAYOUTS = ("SBH", "BSH", "BSND", "BNSD", "TND")
RANKS = {"SBH": 3, "BSH": 3, "BSND": 4, "BNSD": 4, "TND": 3}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_layout(layout) -> None:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; choose one of {', '.join(LAYOUTS)}")


def check_rank(name: str, t, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != RANKS[layout]:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but layout {layout!r} needs a {RANKS[layout]}-d tensor")


def heads_and_dims(q, k, v, layout: str, num_heads) -> tuple[int, int, int, int]:
    """(Nq, Nkv, D, Dv) read from the shapes; checks num_heads for SBH/BSH."""
    if num_heads is not None and (not _is_int(num_heads) or num_heads < 1):
        raise ValueError(f"num_heads={num_heads!r} must be a positive int (the number of query heads)")
    if layout in ("SBH", "BSH"):
        if num_heads is None:
            raise ValueError(f"num_heads is required for layout {layout!r}: pass the number of query heads")
        if q.shape[-1] % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide q's hidden size {q.shape[-1]}; pass Nq with H = Nq * D")
        d = q.shape[-1] // num_heads
        if k.shape[-1] % d:
            raise ValueError(f"k's hidden size {k.shape[-1]} is not a multiple of the head dim {d}; k must be [.., Nkv * D]")
        n_kv = k.shape[-1] // d
        if n_kv == 0 or v.shape[-1] % n_kv:
            raise ValueError(f"v's hidden size {v.shape[-1]} is not a multiple of k's head count {n_kv}")
        return num_heads, n_kv, d, v.shape[-1] // n_kv
    n_axis = 2 if layout == "BSND" else 1
    n_q, n_kv, n_v = q.shape[n_axis], k.shape[n_axis], v.shape[n_axis]
    if num_heads is not None and num_heads != n_q:
        raise ValueError(f"num_heads={num_heads} does not match q's {n_q} heads; omit it or pass {n_q}")
    if n_v != n_kv:
        raise ValueError(f"v has {n_v} heads but k has {n_kv}; k and v must have the same number of heads")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q's head dim {q.shape[-1]} differs from k's {k.shape[-1]}; q and k need the same head dim")
    return n_q, n_kv, q.shape[-1], v.shape[-1]


def check_heads(n_q: int, n_kv: int) -> None:
    if n_kv < 1 or n_q % n_kv:
        raise ValueError(f"k/v have {n_kv} heads, which does not divide q's {n_q} heads; use Nkv dividing Nq (GQA/MQA)")


def batch_and_seq(t: torch.Tensor, layout: str) -> tuple[int, int]:
    """(B, S) of a tensor in ``layout`` (TND: (1, T))."""
    if layout == "SBH":
        return t.shape[1], t.shape[0]
    if layout == "BNSD":
        return t.shape[0], t.shape[2]
    if layout == "TND":
        return 1, t.shape[0]
    return t.shape[0], t.shape[1]


def check_tensors(q, k, v) -> None:
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; use float16, bfloat16, float32 or float64")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; cast q, k and v to one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move q, k and v to one device")


def check_int(name: str, value) -> None:
    if not _is_int(value):
        raise TypeError(f"{name}={value!r} must be an int")


def check_scale_dropout(scale, dropout_p) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"scale={scale!r} must be a finite float or None (None means D ** -0.5)")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p!r} must be a float in [0, 1)")


def check_mode(sparse_mode, atten_mask, pre_tokens: int, next_tokens: int, no_limit: int) -> None:
    """The mask rules of the docstring: which modes need, forbid or ignore ``atten_mask``."""
    if not _is_int(sparse_mode) or not 0 <= sparse_mode <= 4:
        raise ValueError(f"sparse_mode={sparse_mode!r} is not supported; choose 0, 1, 2, 3 or 4")
    if sparse_mode == 1 and atten_mask is None:
        raise ValueError("sparse_mode=1 needs atten_mask (True = masked out); pass one or use another mode")
    if sparse_mode >= 2 and atten_mask is not None:
        raise ValueError(f"atten_mask must be None with sparse_mode={sparse_mode}, which builds its own mask; use mode 0 or 1")
    finite = pre_tokens != no_limit or next_tokens != no_limit
    if sparse_mode == 0 and atten_mask is None and finite:
        raise ValueError(
            f"pre_tokens={pre_tokens}/next_tokens={next_tokens} with sparse_mode=0 need atten_mask; "
            "use sparse_mode=4 for a band without a mask"
        )


def check_mask(atten_mask, q, layout: str, shape: tuple[int, ...]) -> None:
    """``shape`` is [B, Nq, Sq, Skv] (TND: [max Sq, max Skv], the least mask that covers every sequence)."""
    if atten_mask is None:
        return
    if not isinstance(atten_mask, torch.Tensor) or atten_mask.dtype != torch.bool:
        got = atten_mask.dtype if isinstance(atten_mask, torch.Tensor) else type(atten_mask).__name__
        raise TypeError(f"atten_mask has type {got}; pass a bool tensor (True = masked out)")
    if atten_mask.device != q.device:
        raise ValueError(f"atten_mask is on {atten_mask.device} but q is on {q.device}; move it to q's device")
    got = tuple(atten_mask.shape)
    if layout == "TND":
        if len(got) != 2 or got[0] < shape[0] or got[1] < shape[1]:
            raise ValueError(f"atten_mask has shape {got}; for TND pass a 2-d mask of at least {list(shape)} (max Sq, max Skv)")
        return
    ok = len(got) <= 4 and all(g in (1, s) for g, s in zip(reversed(got), reversed(shape[4 - len(got) :]), strict=True))
    if not ok:
        raise ValueError(f"atten_mask has shape {got}, not broadcastable to [B, Nq, Sq, Skv] = {list(shape)}")


def cumulative(name: str, value, total: int) -> tuple[int, ...]:
    """Cumulative end offsets as a tuple: strictly increasing positive ints ending at ``total``."""
    if value is None:
        raise ValueError(f"{name} is required for layout 'TND': pass cumulative end offsets, e.g. [3, 8]")
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-d integer tensor or a sequence of ints, got {value.dtype} {tuple(value.shape)}")
        value = value.tolist()
    if not isinstance(value, Sequence) or not all(_is_int(x) for x in value):
        raise TypeError(f"{name}={value!r} must be a sequence of ints (cumulative end offsets)")
    ends = tuple(value)
    if not ends or any(b <= a for a, b in zip((0, *ends[:-1]), ends, strict=True)):
        raise ValueError(f"{name}={list(ends)} must be strictly increasing positive cumulative offsets (no empty sequence)")
    if ends[-1] != total:
        raise ValueError(f"{name}={list(ends)} ends at {ends[-1]} but the tensor has T={total} tokens; the last offset must be T")
    return ends


def check_alibi(alibi_slopes, q, batch: int, n_q: int) -> None:
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, torch.Tensor) or not alibi_slopes.dtype.is_floating_point:
        raise TypeError("alibi_slopes must be a floating tensor (float32) of shape [Nq] or [B, Nq]")
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {q.device}; move it to q's device")
    if tuple(alibi_slopes.shape) not in ((n_q,), (batch, n_q)):
        raise ValueError(f"alibi_slopes has shape {tuple(alibi_slopes.shape)}; pass [Nq] = [{n_q}] or [B, Nq] = [{batch}, {n_q}]")


def expected_lse_shape(out: torch.Tensor, layout: str, n: int) -> tuple[int, ...] | None:
    """The lse shape that goes with ``out`` in ``layout`` when it has ``n`` heads (None: ``out`` cannot have n heads)."""
    if layout in ("SBH", "BSH"):
        if n < 1 or out.shape[-1] % n:
            return None
        s_axis, b_axis = (0, 1) if layout == "SBH" else (1, 0)
        return (out.shape[b_axis], n, out.shape[s_axis])
    if layout == "TND":
        return (out.shape[0], out.shape[1])
    if layout == "BSND":
        return (out.shape[0], out.shape[2], out.shape[1])
    return tuple(out.shape[:3])


def check_ring(prev_out, prev_lse, cur_out, cur_lse, layout: str) -> None:
    """Shapes, dtypes and devices of :func:`ring_attention_update`'s arguments."""
    check_layout(layout)
    lse_rank = 2 if layout == "TND" else 3
    for name, t, rank in (("prev_out", prev_out, RANKS[layout]), ("cur_out", cur_out, RANKS[layout]),
                          ("prev_lse", prev_lse, lse_rank), ("cur_lse", cur_lse, lse_rank)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} has type {got}; pass a floating tensor")
        if t.dim() != rank:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but layout {layout!r} needs a {rank}-d tensor")
        if t.device != prev_out.device:
            raise ValueError(f"{name} is on {t.device} but prev_out is on {prev_out.device}; move all four to one device")
    if cur_out.shape != prev_out.shape:
        raise ValueError(f"cur_out has shape {tuple(cur_out.shape)} but prev_out has {tuple(prev_out.shape)}; they must match")
    if cur_lse.shape != prev_lse.shape:
        raise ValueError(f"cur_lse has shape {tuple(cur_lse.shape)} but prev_lse has {tuple(prev_lse.shape)}; they must match")
    want = expected_lse_shape(prev_out, layout, prev_lse.shape[1])
    if want != tuple(prev_lse.shape):
        wanted = "[T, N]" if layout == "TND" else "[B, N, S]"
        raise ValueError(
            f"prev_lse has shape {tuple(prev_lse.shape)}, which does not fit prev_out {tuple(prev_out.shape)} "
            f"in layout {layout!r}; pass lse as {wanted}"
        )


def tnd_lengths(actual_seq_qlen, actual_seq_kvlen, t_q: int, t_kv: int):
    """Validated (q ends, kv ends, (longest q sequence, longest kv sequence)) for layout TND."""
    q_ends = cumulative("actual_seq_qlen", actual_seq_qlen, t_q)
    kv_ends = cumulative("actual_seq_kvlen", actual_seq_kvlen, t_kv)
    if len(q_ends) != len(kv_ends):
        raise ValueError(
            f"actual_seq_qlen has {len(q_ends)} sequences but actual_seq_kvlen has {len(kv_ends)}; "
            "give one end offset per sequence in both"
        )
    longest = lambda ends: max(b - a for a, b in zip((0, *ends[:-1]), ends, strict=True))
    return q_ends, kv_ends, (longest(q_ends), longest(kv_ends))


def check_batch_seq(q, k, v, layout: str) -> tuple[int, int, int]:
    """(B, Sq, Skv): k and v must share q's batch and each other's length."""
    batch, s_q = batch_and_seq(q, layout)
    (b_k, s_kv), (b_v, s_v) = batch_and_seq(k, layout), batch_and_seq(v, layout)
    for name, b in (("k", b_k), ("v", b_v)):
        if b != batch:
            raise ValueError(f"{name} has batch size {b} but q has {batch}; q, k and v need the same batch")
    if s_v != s_kv:
        raise ValueError(f"v has sequence length {s_v} but k has {s_kv}; k and v need the same length")
    return batch, s_q, s_kv
