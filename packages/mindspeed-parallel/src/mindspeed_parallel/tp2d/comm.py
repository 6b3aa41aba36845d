"""Collectives along the first or last dimension of a tensor, and a ring exchange for overlap.

These are plain (not differentiable) building blocks for the TP-2D and NDMM autograd functions.
Every helper takes its process group from the caller; a group of one rank short-cuts to a copy-free
return so 1 x N grids cost nothing on the trivial axis.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_first",
    "all_gather_last",
    "all_reduce_sum",
    "group_rank",
    "group_size",
    "reduce_scatter_first",
    "reduce_scatter_last",
    "ring_exchange",
]


class _Done:
    """Stand-in for the work handle of a collective that did not need to run."""

    def wait(self) -> bool:
        return True


def group_size(group: dist.ProcessGroup) -> int:
    """Number of ranks in ``group``."""
    return dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup) -> int:
    """This process's rank inside ``group`` (0-based)."""
    return dist.get_rank(group)


def _gather_single():
    # torch >= 2.10 renames all_gather_into_tensor (deprecated there); older torch only has the old name.
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _scatter_single():
    return getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_first(x: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    """Concatenate every rank's ``x`` along dim 0 in group-rank order: ``[n, *r] -> [P*n, *r]``.

    Returns the gathered tensor, or ``(tensor, handle)`` with ``async_op=True`` (wait on the
    handle before reading the tensor).
    """
    size = group_size(group)
    if size == 1:
        return (x, _Done()) if async_op else x
    x = x.contiguous()
    out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    handle = _gather_single()(out, x, group=group, async_op=async_op)
    return (out, handle) if async_op else out


def reduce_scatter_first(x: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    """Sum ``x`` over the group and keep this rank's block of dim 0: ``[P*n, *r] -> [n, *r]``.

    Returns the block, or ``(block, handle)`` with ``async_op=True``; ``x`` must stay alive and
    unmodified until the handle is waited on.
    """
    size = group_size(group)
    if size == 1:
        return (x, _Done()) if async_op else x
    x = x.contiguous()
    out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    handle = _scatter_single()(out, x, group=group, async_op=async_op)
    return (out, handle) if async_op else out


def all_gather_last(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dim in group-rank order: ``[*l, h] -> [*l, P*h]``."""
    size = group_size(group)
    if size == 1:
        return x
    stacked = all_gather_first(x.unsqueeze(0), group)  # [P, *l, h]
    return stacked.movedim(0, -2).reshape(*x.shape[:-1], size * x.shape[-1])


def reduce_scatter_last(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum ``x`` over the group and keep this rank's block of the last dim: ``[*l, P*h] -> [*l, h]``."""
    size = group_size(group)
    if size == 1:
        return x
    blocks = x.reshape(*x.shape[:-1], size, x.shape[-1] // size).movedim(-2, 0)  # [P, *l, h]
    return reduce_scatter_first(blocks, group).squeeze(0)


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """In-place sum of ``x`` over ``group`` (returns ``x``)."""
    if group_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


def ring_exchange(local: torch.Tensor, group: dist.ProcessGroup) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(source_rank, piece)`` for every rank's ``local`` tensor, own piece first.

    A ring all-gather made of send/recv steps: before a piece is handed to the caller, the
    transfer of the next one (from rank+1, while passing the current one to rank-1) is already
    posted, so whatever the caller computes on the piece overlaps that transfer. The caller must
    not modify a yielded piece. All ranks of ``group`` must consume the whole iterator.
    """
    size, rank = group_size(group), group_rank(group)
    current = local.contiguous()
    if size == 1:
        yield rank, current
        return
    send_to = dist.get_global_rank(group, (rank - 1) % size)
    recv_from = dist.get_global_rank(group, (rank + 1) % size)
    for step in range(size):
        requests, incoming = [], None
        if step < size - 1:
            incoming = torch.empty_like(current)
            requests = [dist.isend(current, send_to, group=group), dist.irecv(incoming, recv_from, group=group)]
        yield (rank + step) % size, current
        for request in requests:
            request.wait()
        current = incoming
