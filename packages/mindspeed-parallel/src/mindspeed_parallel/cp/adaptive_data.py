"""Splitting sequences into the remapped layout of an adaptive-CP plan, and gathering them back.

``adaptive_cp_algo``: cp rank ``r`` holds the global positions ``plan.indices(r)`` (ascending).
``hybrid_adaptive_cp_algo``: the plan is for the adaptive (ring) degree ``R``; adaptive rank
``a``'s positions are then split contiguously over the Ulysses degree ``u``, and
``cp_rank = a * u + ulysses_rank`` (the numbering of `hybrid.make_hybrid_groups`).

The index functions also give each rank's position ids (for RoPE). Gathers use ``all_gather``
on the caller's group and are not differentiable (loss/metric reassembly and tests).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mindspeed_parallel.cp.adaptive import AdaptivePlan

__all__ = [
    "adaptive_gather",
    "adaptive_split",
    "hybrid_adaptive_gather",
    "hybrid_adaptive_indices",
    "hybrid_adaptive_split",
]


def _dim(x: torch.Tensor, seq_dim: int) -> int:
    if not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"seq_dim={seq_dim} is out of range for a {x.dim()}-d tensor")
    return seq_dim % x.dim()


def _check_plan(plan) -> None:
    if not isinstance(plan, AdaptivePlan):
        raise TypeError(f"plan must be an AdaptivePlan (from adaptive.build_plan), got {type(plan).__name__}")


def _check_len(name: str, length: int, plan: AdaptivePlan) -> None:
    if length != plan.seq_len:
        raise ValueError(f"{name} has length {length} but the plan is for S = {plan.seq_len}; build the plan for this mask")


def adaptive_split(x: torch.Tensor, plan: AdaptivePlan, cp_rank: int, seq_dim: int) -> torch.Tensor:
    """This rank's remapped part of ``x`` along ``seq_dim``: [..., S, ...] -> [..., S // cp, ...] (a copy)."""
    _check_plan(plan)
    dim = _dim(x, seq_dim)
    _check_len(f"x's dim {dim}", x.shape[dim], plan)
    return x.index_select(dim, plan.indices(cp_rank, device=x.device))


def adaptive_gather(local: torch.Tensor, plan: AdaptivePlan, group, seq_dim: int) -> torch.Tensor:
    """Inverse of :func:`adaptive_split` over ``group`` (cp ranks in order): [..., S // cp, ...] -> [..., S, ...].

    Collective: every rank of ``group`` calls it with the same local shape.
    """
    _check_plan(plan)
    dim = _dim(local, seq_dim)
    cp = dist.get_world_size(group)
    if cp != plan.cp or local.shape[dim] * cp != plan.seq_len:
        raise ValueError(f"local has {local.shape[dim]} rows on {cp} ranks but the plan is for cp={plan.cp}, S={plan.seq_len}")
    return _place(_all_gather(local, group), dim, [plan.indices(r, device=local.device) for r in range(cp)])


def hybrid_adaptive_indices(plan: AdaptivePlan, ulysses_degree: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions held by ``cp_rank`` of a ``u * R`` group (``plan.cp == R``): int64 [S // (u * R)]."""
    _check_plan(plan)
    if not isinstance(ulysses_degree, int) or ulysses_degree < 1:
        raise ValueError(f"ulysses_degree={ulysses_degree!r} must be a positive int")
    if not isinstance(cp_rank, int) or not 0 <= cp_rank < ulysses_degree * plan.cp:
        raise ValueError(f"cp_rank={cp_rank!r} must be an int in [0, ulysses_degree * plan.cp = {ulysses_degree * plan.cp})")
    if plan.local_len % ulysses_degree:
        raise ValueError(
            f"ulysses_degree={ulysses_degree} does not divide the adaptive-local length {plan.local_len}; S must divide by u * R"
        )
    adaptive_rank, ulysses_rank = divmod(cp_rank, ulysses_degree)
    chunk = plan.local_len // ulysses_degree
    rows = plan.indices(adaptive_rank, device=device)
    return rows[ulysses_rank * chunk : (ulysses_rank + 1) * chunk]


def hybrid_adaptive_split(x: torch.Tensor, plan: AdaptivePlan, ulysses_degree: int, cp_rank: int, seq_dim: int) -> torch.Tensor:
    """This rank's hybrid-adaptive part of ``x``: [..., S, ...] -> [..., S // (u * R), ...] (a copy)."""
    dim = _dim(x, seq_dim)
    rows = hybrid_adaptive_indices(plan, ulysses_degree, cp_rank, device=x.device)
    _check_len(f"x's dim {dim}", x.shape[dim], plan)
    return x.index_select(dim, rows)


def hybrid_adaptive_gather(local: torch.Tensor, plan: AdaptivePlan, cp_group, ulysses_degree: int, seq_dim: int) -> torch.Tensor:
    """Inverse of :func:`hybrid_adaptive_split` over the whole ``u * R`` cp group: -> [..., S, ...]."""
    dim = _dim(local, seq_dim)
    cp = dist.get_world_size(cp_group)
    if cp != ulysses_degree * plan.cp or local.shape[dim] * cp != plan.seq_len:
        raise ValueError(
            f"local has {local.shape[dim]} rows on {cp} ranks; expected u * R = {ulysses_degree} * {plan.cp} ranks of "
            f"{plan.seq_len // max(ulysses_degree * plan.cp, 1)} rows"
        )
    rows = [hybrid_adaptive_indices(plan, ulysses_degree, r, device=local.device) for r in range(cp)]
    return _place(_all_gather(local, cp_group), dim, rows)


def _all_gather(local: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return parts


def _place(parts: list[torch.Tensor], dim: int, rows: list[torch.Tensor]) -> torch.Tensor:
    first = parts[0]
    out = first.new_empty((*first.shape[:dim], sum(r.numel() for r in rows), *first.shape[dim + 1 :]))
    for part, idx in zip(parts, rows, strict=True):
        out.index_copy_(dim, idx, part)
    return out
