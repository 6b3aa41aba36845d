"""Adaptive context-parallel attention (``adaptive_cp_algo``, ``hybrid_adaptive_cp_algo``).

Executes an :class:`~mindspeed_parallel.cp.adaptive.AdaptivePlan`: each rank holds the remapped
tokens ``plan.indices(rank)`` (`mindspeed_parallel.cp.adaptive_data.adaptive_split`). Round by
round, every task (a non-empty block of query rank i x key rank j, trimmed to its visible rows)
is computed by its executor: when that is rank i, rank j first sends it the trimmed K/V; when
it is rank j, rank i sends the trimmed queries and gets the partial (out, lse) back. Partial
results merge in float32 (`mindspeed_kernels.ops.ring_attention_update`). Backward replays the
rounds, recomputing each block (`_ring_blocks.block_grads`) and returning the query / key-value
gradient parts to their owners.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mindspeed_parallel.cp._ring_blocks import Block, Geometry, Rows, attend, block_grads, merge, rows_to_lse
from mindspeed_parallel.cp.adaptive import AdaptiveOptions, AdaptivePlan, Task, build_plan, causal_mask
from mindspeed_parallel.cp.ulysses import ulysses_attention

__all__ = ["adaptive_attention", "hybrid_adaptive_attention"]

_ALL = Rows(slice(None))
# the executor works on trimmed row sets gathered into dense tensors: every block is "all rows"
_GEOM = Geometry(False, _ALL, _ALL, _ALL)
_LSE_DIM = 2  # lse / delta are [B, N, rows]


@dataclass(frozen=True, eq=False)
class _Config:
    group: object
    ranks: tuple[int, ...]  # global ranks in cp order
    rank: int
    plan: AdaptivePlan
    mask: torch.Tensor
    scale: float | None

    @staticmethod
    def compute_dtype(dtype: torch.dtype) -> torch.dtype:
        """Blocks run in float32 for half inputs, so bf16 results are rounded once (as in ring.py)."""
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def acc_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(self.compute_dtype(dtype), torch.float32)

    def block_mask(self, task: Task, device: torch.device) -> torch.Tensor | None:
        """The task's slice of the global mask on ``device``; None when nothing in it is masked."""
        sub = self.mask.index_select(-2, task.q_pos.to(self.mask.device))
        sub = sub.index_select(-1, task.kv_pos.to(self.mask.device))
        return sub.to(device, non_blocking=True) if bool(sub.any()) else None


def adaptive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group,
    *,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
    plan: AdaptivePlan | None = None,
    scale: float | None = None,
    options: AdaptiveOptions | None = None,
    cu_seqlens=None,
) -> torch.Tensor:
    """Attention of this rank's (remapped) queries over the whole sequence split across ``group``.

    SBND q [S/cp, B, Nq, D], k [S/cp, B, Nkv, D], v [S/cp, B, Nkv, Dv] (Nkv | Nq), rank r
    holding ``plan.indices(r)`` (see `adaptive_data.adaptive_split`). ``attention_mask``: bool
    [S, S] or [B, 1, S, S] in global positions, True = masked out (cp_attention_mask_type
    'general'; it may stay on the CPU, attention_mask_on_cpu: only block slices move to q's
    device); or ``causal=True`` without a mask for the causal mask. ``plan``: from
    `adaptive.build_plan` / `adaptive.AdaptivePlanner` for this mask and cp size; None builds
    one with ``options`` (every rank computes the same). A plan built for another mask is only
    right if its tasks cover every pair this mask leaves visible. Returns out [S/cp, B, Nq, Dv] in q's
    dtype; a query row seeing no key gets 0. ``scale`` defaults to ``D ** -0.5``. Packed TND
    (``cu_seqlens``) is not supported. Differentiable in q, k, v; collective over ``group``.
    """
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens: adaptive_attention takes SBND only; express packed documents in attention_mask")
    _check_tensors(q, k, v)
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    mask = _resolve_mask(attention_mask, causal, q, cp)
    if plan is None:
        plan = build_plan(mask, cp, options)
    _check_plan(plan, cp, q.shape[0] * cp)
    cfg = _Config(group, tuple(dist.get_process_group_ranks(group)), rank, plan, mask, scale)
    return _AdaptiveAttention.apply(q, k, v, cfg)


def hybrid_adaptive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ulysses_group,
    adaptive_group,
    attention_mask: torch.Tensor | None = None,
    causal: bool = False,
    plan: AdaptivePlan | None = None,
    scale: float | None = None,
    options: AdaptiveOptions | None = None,
    kv_head_repeat: bool = True,
) -> torch.Tensor:
    """``hybrid_adaptive_cp_algo``: Ulysses over ``ulysses_group`` (u ranks), adaptive attention
    over ``adaptive_group`` (R ranks) on the gathered adaptive-local sequence.

    Groups as `hybrid.make_hybrid_groups` builds them (its ring group is the adaptive group;
    cp_rank = adaptive_rank * u + ulysses_rank). ``plan`` is for R ranks; data split by
    `adaptive_data.hybrid_adaptive_split`. q [S/(u*R), B, Nq, D] (Nq divisible by u; Nkv too or
    ``kv_head_repeat``) -> out [S/(u*R), B, Nq, Dv]. Mask options as `adaptive_attention`.
    """
    if ulysses_group is None or adaptive_group is None:
        raise ValueError("ulysses_group, adaptive_group: both are required; create them with hybrid.make_hybrid_groups")
    attn_fn = functools.partial(
        adaptive_attention, group=adaptive_group, attention_mask=attention_mask, causal=causal, plan=plan, scale=scale,
        options=options,
    )  # fmt: skip
    return ulysses_attention(q, k, v, ulysses_group, attn_fn=attn_fn, kv_head_repeat=kv_head_repeat)


# ----------------------------------------------------------------------------- validation


def _check_tensors(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; adaptive_attention expects SBND [S, B, N, D]")
    if k.shape[:-1] != v.shape[:-1] or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: rows, batch and q/k head dim must match")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"k/v have {k.shape[2]} heads, which does not divide q's {q.shape[2]} heads (GQA needs Nkv | Nq)")


def _resolve_mask(mask, causal: bool, q: torch.Tensor, cp: int) -> torch.Tensor:
    seq = q.shape[0] * cp
    if mask is None:
        if not causal:
            raise ValueError("attention_mask is required (cp_attention_mask_type 'general'); or pass causal=True")
        return causal_mask(seq)
    if causal:
        raise ValueError(
            "attention_mask is given with causal=True; pass causal=False with a general mask (fold causality into it)"
        )
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("attention_mask must be a bool tensor (True = masked out)")
    ok = tuple(mask.shape[-2:]) == (seq, seq) and (
        mask.dim() == 2 or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[0] in (1, q.shape[1]))
    )
    if not ok:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; pass [S, S] or [B, 1, S, S] with global S = {seq}")
    return mask


def _check_plan(plan, cp: int, seq: int) -> None:
    if not isinstance(plan, AdaptivePlan):
        raise TypeError(f"plan must be an AdaptivePlan (from build_plan / AdaptivePlanner), got {type(plan).__name__}")
    if plan.cp != cp or plan.seq_len != seq:
        raise ValueError(
            f"plan is for cp={plan.cp}, S={plan.seq_len} but the call has cp={cp}, S={seq}; build it for this mask and group"
        )


# ----------------------------------------------------------------------------- point to point


class _Batch:
    """Sends and receives of one phase, posted together and waited for together."""

    def __init__(self, cfg: _Config):
        self.cfg, self.ops = cfg, []

    def send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        self.ops.append(dist.P2POp(dist.isend, t.contiguous(), self.cfg.ranks[dst], self.cfg.group, tag))

    def recv(self, like: torch.Tensor, dim: int, rows: int, src: int, tag: int) -> torch.Tensor:
        shape = list(like.shape)
        shape[dim] = rows
        buf = like.new_empty(shape)
        self.ops.append(dist.P2POp(dist.irecv, buf, self.cfg.ranks[src], self.cfg.group, tag))
        return buf

    def run(self) -> None:
        if self.ops:
            for work in dist.batch_isend_irecv(self.ops):
                work.wait()


def _tag(task: Task, slot: int) -> int:
    return task.index * 16 + slot


def _fetch(tasks, cfg: _Config, q_items, kv_items) -> dict[int, tuple[list, list]]:
    """Inputs of the tasks this rank executes: ``{index: (q-side rows, kv-side rows)}``.

    ``q_items`` / ``kv_items``: ``(tensor, row_dim)`` of the query / key-value owner; each task
    needs their trimmed rows, sent by the owner when it is not the executor.
    """
    me, batch, mine = cfg.rank, _Batch(cfg), {}
    for t in tasks:
        sides = ((t.q_rank, t.q_rows, q_items, 0), (t.kv_rank, t.kv_rows, kv_items, 8))
        if t.executor == me:
            mine[t.index] = tuple(
                [x.index_select(d, rows.to(x.device)) if owner == me else batch.recv(x, d, rows.numel(), owner, _tag(t, base + s))
                 for s, (x, d) in enumerate(items)]
                for owner, rows, items, base in sides
            )  # fmt: skip
            continue
        for owner, rows, items, base in sides:
            if owner == me:
                for s, (x, d) in enumerate(items):
                    batch.send(x.index_select(d, rows.to(x.device)), t.executor, _tag(t, base + s))
    batch.run()
    return mine


def _deliver(tasks, cfg: _Config, results, q_like, kv_like) -> list[tuple[Task, list, list]]:
    """Return each executed task's (q-side, kv-side) results to their owners; yields, for the tasks
    whose queries or keys this rank owns, ``(task, q-side results | [], kv-side results | [])``."""
    me, batch, owned = cfg.rank, _Batch(cfg), []
    for t in tasks:
        sides = []
        for side, (owner, rows, like, base) in enumerate(((t.q_rank, t.q_rows, q_like, 0), (t.kv_rank, t.kv_rows, kv_like, 8))):
            if t.executor == me and owner == me:
                sides.append(results[t.index][side])
            elif t.executor == me:
                for s, x in enumerate(results[t.index][side]):
                    batch.send(x, owner, _tag(t, base + s))
                sides.append([])
            elif owner == me:
                sides.append([batch.recv(x, d, rows.numel(), t.executor, _tag(t, base + s)) for s, (x, d) in enumerate(like)])
            else:
                sides.append([])
        if t.q_rank == me or t.kv_rank == me:
            owned.append((t, *sides))
    batch.run()
    return owned


# ----------------------------------------------------------------------------- forward / backward


def _forward(q, k, v, cfg: _Config):
    cd, acc = cfg.compute_dtype(q.dtype), cfg.acc_dtype(q.dtype)
    acc_out = q.new_zeros((*q.shape[:-1], v.shape[-1]), dtype=acc)
    acc_lse = q.new_full((q.shape[1], q.shape[2], q.shape[0]), float("-inf"), dtype=acc)
    for tasks in cfg.plan.rounds:
        results = {}
        for index, ((qt,), (kt, vt)) in _fetch(tasks, cfg, [(q, 0)], [(k, 0), (v, 0)]).items():
            task = next(t for t in tasks if t.index == index)
            block = Block(_ALL, _ALL, mask=cfg.block_mask(task, q.device))
            out, lse = attend(qt.to(cd), kt.to(cd), vt.to(cd), block, _GEOM, cfg.scale)
            results[index] = ([out.to(acc), lse.to(acc)], [])
        for task, q_side, _ in _deliver(tasks, cfg, results, [(acc_out, 0), (acc_lse, _LSE_DIM)], []):
            if task.q_rank == cfg.rank:
                merge(acc_out, acc_lse, Rows(task.q_rows.to(q.device)), *q_side, _GEOM)
    return acc_out, acc_lse


def _backward(dout, q, k, v, out, lse, cfg: _Config):
    cd, acc = cfg.compute_dtype(q.dtype), cfg.acc_dtype(q.dtype)
    delta = rows_to_lse((dout.to(out.dtype) * out).sum(-1), _GEOM)  # D_i = dO_i . O_i, [B, N, S/cp]
    dq, dk, dv = (torch.zeros_like(t, dtype=acc) for t in (q, k, v))
    q_items = [(q, 0), (dout, 0), (lse, _LSE_DIM), (delta, _LSE_DIM)]
    for tasks in cfg.plan.rounds:
        results = {}
        for index, ((qt, dt, lt, det), (kt, vt)) in _fetch(tasks, cfg, q_items, [(k, 0), (v, 0)]).items():
            task = next(t for t in tasks if t.index == index)
            block = Block(_ALL, _ALL, mask=cfg.block_mask(task, q.device))
            gq, gk, gv = block_grads(qt.to(cd), kt.to(cd), vt.to(cd), dt, lt, det, block, _GEOM, cfg.scale)
            results[index] = ([gq.to(acc)], [gk.to(acc), gv.to(acc)])
        for task, q_side, kv_side in _deliver(tasks, cfg, results, [(dq, 0)], [(dk, 0), (dv, 0)]):
            if task.q_rank == cfg.rank:
                dq.index_add_(0, task.q_rows.to(q.device), q_side[0])
            if task.kv_rank == cfg.rank:
                rows = task.kv_rows.to(q.device)
                dk.index_add_(0, rows, kv_side[0])
                dv.index_add_(0, rows, kv_side[1])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _AdaptiveAttention(torch.autograd.Function):
    """Saves the local q, k, v and the float32 out / lse; backward replays the plan's rounds."""

    @staticmethod
    def forward(ctx, q, k, v, cfg: _Config):
        out, lse = _forward(q, k, v, cfg)
        ctx.save_for_backward(q, k, v, out, lse)  # out stays float32: D = dO . O needs it (see ring.py)
        ctx.cfg = cfg
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, ctx.cfg)
        return dq, dk, dv, None
