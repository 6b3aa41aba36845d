"""Ring attention over a context-parallel group (``megatron_cp_algo``).

Each cp rank holds a zig-zag part of the sequence (chunks ``r`` and ``2cp-1-r`` of ``2cp``,
see `mindspeed_parallel.cp.data`). Queries stay put; K/V blocks travel around the ring
(optionally a double ring: inside windows of ``window_size`` ranks first, then between
windows), and each rank merges the partial attention of every block it sees in float32 with
`mindspeed_kernels.ops.ring_attention_update`. Only the visible part of each block is
computed. Backward runs the ring again, recomputing each block, and sends the K/V gradient
accumulators around with the blocks so every rank ends with the gradients of its own K/V.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mindspeed_parallel.cp._ring_blocks import (
    Block,
    Geometry,
    MaskSlicer,
    attend,
    block_grads,
    causal_blocks,
    make_geometry,
    merge,
    rows_to_lse,
)
from mindspeed_parallel.cp._ring_comm import RingComm, ring_schedule
from mindspeed_parallel.cp.data import _lengths

__all__ = ["make_double_ring_groups", "ring_attention"]


@dataclass(frozen=True)
class _Config:
    """Everything but the tensors, fixed for one call (forward and its backward)."""

    group: object
    inner_group: object
    outer_group: object
    cp: int
    rank: int
    window: int  # ranks per inner ring; == cp for a single ring
    causal: bool
    mask: torch.Tensor | None
    scale: float | None
    local_cu: tuple[int, ...] | None
    overlap: bool = False
    block_dtype: torch.dtype | None = None  # dtype blocks are computed in (None: float32 for fp16/bf16)

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.block_dtype is not None:
            return self.block_dtype
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def acc_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Accumulators: float32, float64 for float64 inputs."""
        return torch.promote_types(self.compute_dtype(dtype), torch.float32)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group,
    *,
    causal: bool = True,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    cu_seqlens=None,
    window_size: int = 1,
    inner_group=None,
    outer_group=None,
    send_recv_overlap: bool = False,
    block_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Attention of this rank's queries over the whole sequence split across ``group``.

    Shapes: SBND ``q`` [S/cp, B, Nq, D], ``k`` [S/cp, B, Nkv, D], ``v`` [S/cp, B, Nkv, Dv]
    (``Nkv`` dividing ``Nq``: GQA/MQA), each rank holding its zig-zag part
    (`mindspeed_parallel.cp.data.zigzag_split`; S divisible by ``2 * cp``); or packed TND
    ``q`` [T/cp, Nq, D] with ``cu_seqlens`` this rank's cumulative sequence ends (global / cp,
    each sequence zig-zag split on its own; no attention across sequences). Returns the
    attention output for the local queries, [S/cp, B, Nq, Dv] (TND [T/cp, Nq, Dv]), in q's dtype.

    Masks: ``causal=True`` (the default), or ``causal=False`` with a general
    ``attention_mask`` (bool [S, S] or [B, 1, S, S] in *global* positions, True = masked out; it
    may stay on the CPU, only each block's slice is moved to q's device), or ``causal=False``
    without a mask: full bidirectional attention. TND takes no ``attention_mask``. A query row
    with no visible key gets 0 (as `mindspeed_kernels.ops.flash_attention`).
    ``scale`` defaults to ``D ** -0.5``.

    Double ring (``cp_window_size``): ``window_size`` w > 1 dividing cp and less than cp, with
    ``inner_group`` / ``outer_group`` from :func:`make_double_ring_groups`. The result is the
    single ring's. ``send_recv_overlap`` posts the next block's transfer before computing the
    current one. Differentiable in q, k and v; collective over ``group``: every rank calls it
    with the same shapes and options.

    Precision: K/V travel in their own dtype; each block's attention runs in ``block_dtype``
    (default: float32 for float16/bfloat16 inputs, else the input dtype) and partial results
    are merged in float32, so a bf16 result is rounded once, like single-process attention.
    ``block_dtype=torch.bfloat16`` computes blocks in bf16 (faster on accelerators): every
    block's output and gradients are then rounded before the merge, measured at up to ~3x the
    single-process bf16 error on 2 ranks.
    """
    cfg = _make_config(q, k, v, group, causal, attention_mask, scale, cu_seqlens, window_size, inner_group, outer_group)
    if block_dtype is not None and (not isinstance(block_dtype, torch.dtype) or not block_dtype.is_floating_point):
        raise TypeError(f"block_dtype={block_dtype!r} must be a floating torch.dtype or None (float32 for half inputs)")
    cfg = dataclasses.replace(cfg, overlap=bool(send_recv_overlap), block_dtype=block_dtype)
    return _RingAttention.apply(q, k, v, cfg)


def make_double_ring_groups(cp_ranks: list[int], window_size: int):
    """Create the double-ring groups for the cp group of global ranks ``cp_ranks`` (in cp-rank order).

    Inner groups: ``window_size`` consecutive cp ranks; outer groups: the ranks at the same
    position of every window. Collective over the *default* group: every process calls it, with
    the same arguments and in the same order for every cp group (it calls ``dist.new_group`` for
    every group). Returns ``(inner_group, outer_group)`` of this rank, ``(None, None)`` for a
    rank outside ``cp_ranks``.
    """
    cp_ranks = [int(r) for r in cp_ranks]
    _check_window(window_size, len(cp_ranks), double=True)
    me = dist.get_rank()
    inner = outer = None
    for start in range(0, len(cp_ranks), window_size):
        members = cp_ranks[start : start + window_size]
        created = dist.new_group(members)
        inner = created if me in members else inner
    for pos in range(window_size):
        members = cp_ranks[pos::window_size]
        created = dist.new_group(members)
        outer = created if me in members else outer
    return inner, outer


# ----------------------------------------------------------------------------- validation


def _check_window(window_size, cp: int, double: bool) -> None:
    if not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size={window_size!r} must be a positive int (cp_window_size; 1 = single ring)")
    if cp % window_size:
        raise ValueError(f"window_size={window_size} does not divide the cp size {cp}; pick a divisor of {cp} (cp_window_size)")
    if (double or window_size > 1) and window_size >= cp:
        raise ValueError(
            f"window_size={window_size} must be less than the cp size {cp} (cp_window_size in [1, cp)); use 1 for a single ring"
        )


def _check_group(name: str, group, expected: list[int]) -> None:
    if group is None:
        raise ValueError(
            f"{name} is None but window_size > 1 needs it; create it with make_double_ring_groups(cp_ranks, window_size)"
        )
    got = dist.get_process_group_ranks(group)
    if sorted(got) != sorted(expected):
        raise ValueError(
            f"{name} has ranks {sorted(got)} but this rank needs {sorted(expected)}; build it with make_double_ring_groups"
        )


def _check_tensors(q, k, v, cu_seqlens) -> tuple[int, ...] | None:
    """Shapes and dtypes; returns the local cumulative ends for TND."""
    want = 3 if cu_seqlens is not None else 4
    layout = "TND [T, N, D] (cu_seqlens given)" if want == 3 else "SBND [S, B, N, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
        if t.dim() != want:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; ring_attention expects {layout}")
    if k.shape[:-1] != v.shape[:-1] or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: rows, batch and q/k head dim must match")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"k/v have {k.shape[-2]} heads, which does not divide q's {q.shape[-2]} heads (GQA needs Nkv | Nq)")
    if cu_seqlens is None:
        if q.shape[0] % 2:
            raise ValueError(
                f"q has {q.shape[0]} local rows (odd): the global sequence must divide by 2 * cp; pad it and zigzag_split it"
            )
        return None
    lengths = _lengths(cu_seqlens)
    if sum(lengths) != q.shape[0]:
        raise ValueError(
            f"cu_seqlens ends at {sum(lengths)} but q has {q.shape[0]} tokens; pass this rank's local cumulative ends"
        )
    if any(n % 2 for n in lengths):
        raise ValueError(
            f"cu_seqlens: local sequence lengths {lengths} must be even (global lengths divisible by 2 * cp); pad them"
        )
    return tuple(torch.tensor(lengths).cumsum(0).tolist())


def _check_mask(attention_mask, causal: bool, cu_seqlens, q, cp: int) -> None:
    if attention_mask is None:
        return
    if causal:
        raise ValueError(
            "attention_mask is given with causal=True; pass causal=False with a general mask (fold causality into it)"
        )
    if cu_seqlens is not None:
        raise ValueError("attention_mask is not supported with cu_seqlens (TND); use causal=True or causal=False without a mask")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool:
        raise TypeError("attention_mask must be a bool tensor (True = masked out)")
    s = q.shape[0] * cp
    ok = (s, s) == tuple(attention_mask.shape[-2:]) and (
        attention_mask.dim() == 2
        or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[0] in (1, q.shape[1]))
    )
    if not ok:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; pass [S, S] or [B, 1, S, S] with global S = {s}"
        )


def _make_config(q, k, v, group, causal, mask, scale, cu_seqlens, window_size, inner_group, outer_group) -> _Config:
    local_cu = _check_tensors(q, k, v, cu_seqlens)
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    _check_mask(mask, causal, cu_seqlens, q, cp)
    _check_window(window_size, cp, double=False)
    window = cp
    if window_size > 1:
        ranks = dist.get_process_group_ranks(group)
        win, pos = divmod(rank, window_size)
        _check_group("inner_group", inner_group, ranks[win * window_size : (win + 1) * window_size])
        _check_group("outer_group", outer_group, ranks[pos::window_size])
        window = window_size
    else:
        inner_group = outer_group = None
    return _Config(group, inner_group, outer_group, cp, rank, window, bool(causal), mask, scale, local_cu)


# ----------------------------------------------------------------------------- the ring


def _planner(cfg: _Config, geom: Geometry, device) -> Callable[[int], list[Block]]:
    """``plan(src)``: the blocks to compute against the K/V of cp rank ``src``."""
    if cfg.mask is not None:
        return MaskSlicer(cfg.mask, cfg.cp, cfg.rank, geom, device).blocks
    if cfg.causal:
        return lambda src: causal_blocks(geom, cfg.rank, src)
    return lambda src: [Block(geom.all, geom.all)]


def _setup(q: torch.Tensor, cfg: _Config):
    geom = make_geometry(q, cfg.local_cu)
    comm = RingComm(ring_schedule(cfg.cp, cfg.window), cfg.group, cfg.inner_group, cfg.outer_group)
    return geom, comm, _planner(cfg, geom, q.device)


def _ring_forward(q, k, v, cfg: _Config):
    geom, comm, plan = _setup(q, cfg)
    cd = cfg.compute_dtype(q.dtype)
    q_c = q.to(cd)
    acc_out = q.new_zeros((*q.shape[:-1], v.shape[-1]), dtype=cfg.acc_dtype(q.dtype))
    lse_shape = (q.shape[0], q.shape[1]) if geom.tnd else (q.shape[1], q.shape[2], q.shape[0])
    acc_lse = q.new_full(lse_shape, float("-inf"), dtype=cfg.acc_dtype(q.dtype))
    kv = [k, v]
    steps = len(comm.schedule.held)
    for step in range(steps):
        # overlap: the next block's transfer runs while this one is computed; else it follows
        pending = comm.start(kv, step) if cfg.overlap and step + 1 < steps else None
        k_c, v_c = (t.to(cd) for t in kv)
        for block in plan(comm.schedule.held[step][cfg.rank]):
            out, lse = attend(block.q.take(q_c), block.kv.take(k_c), block.kv.take(v_c), block, geom, cfg.scale)
            merge(acc_out, acc_lse, block.q, out, lse, geom)
        if pending is not None:
            kv = pending.wait()
        elif step + 1 < steps:
            kv = comm.start(kv, step).wait()
    return acc_out, acc_lse


def _step_grads(q, kv, dout, lse, delta, blocks, geom: Geometry, cfg: _Config, dq):
    """Adds this step's query gradients into ``dq``; returns the held block's K/V gradients
    (in the accumulator dtype: float32, float64 for float64 inputs).

    ``q`` is already in the compute dtype (see ``block_dtype``); K/V are cast to it here.
    """
    k, v = (t.to(q.dtype) for t in kv)
    acc = cfg.acc_dtype(q.dtype)
    dk, dv = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
    for block in blocks:
        gq, gk, gv = block_grads(q, k, v, dout, lse, delta, block, geom, cfg.scale)
        block.q.add(dq, 0, gq.to(acc))
        block.kv.add(dk, 0, gk.to(acc))
        block.kv.add(dv, 0, gv.to(acc))
    return dk, dv


def _ring_backward(dout, q, k, v, out, lse, cfg: _Config):
    geom, comm, plan = _setup(q, cfg)
    delta = rows_to_lse((dout.to(out.dtype) * out).sum(-1), geom)  # D_i = dO_i . O_i
    acc_dtype = cfg.acc_dtype(q.dtype)
    dq = torch.zeros_like(q, dtype=acc_dtype)
    q_compute = q.to(cfg.compute_dtype(q.dtype))
    kv = [k, v]
    acc = [torch.zeros_like(k, dtype=acc_dtype), torch.zeros_like(v, dtype=acc_dtype)]
    steps, pending_acc = len(comm.schedule.held), None
    for step in range(steps):
        last = step + 1 == steps
        pending_kv = comm.start(kv, step) if cfg.overlap and not last else None
        dk, dv = _step_grads(q_compute, kv, dout, lse, delta, plan(comm.schedule.held[step][cfg.rank]), geom, cfg, dq)
        if cfg.overlap:
            # the accumulator of the held block arrives from its previous holder while we compute
            acc = pending_acc.wait() if pending_acc is not None else acc
            acc[0].add_(dk)
            acc[1].add_(dv)
            pending_acc = None if last else comm.start(acc, step, tag=2)
            kv = pending_kv.wait() if pending_kv is not None else kv
        else:
            acc[0].add_(dk)
            acc[1].add_(dv)
            if not last:
                *kv, acc0, acc1 = comm.start(kv + acc, step).wait()
                acc = [acc0, acc1]
    dk, dv = comm.return_home(acc, tag=4)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    """Saves only the local q, k, v, the float32 out and lse; backward re-runs the ring."""

    @staticmethod
    def forward(ctx, q, k, v, cfg: _Config):
        out, lse = _ring_forward(q, k, v, cfg)
        # out is kept in float32: D = dO . O from a bf16-rounded O alone made dq up to 2.6x less
        # accurate than single-process bf16 attention (measured on 2 ranks)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = cfg
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, ctx.cfg)
        return dq, dk, dv, None
