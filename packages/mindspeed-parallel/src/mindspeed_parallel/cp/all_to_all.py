"""Differentiable all-to-all over a process group: scatter one dimension, gather another.

Ulysses context parallelism trades a sequence split for a head split with this exchange:
``[S/u, B, N, D]`` -> ``all_to_all(x, group, scatter_dim=2, gather_dim=0)`` -> ``[S, B, N/u, D]``.
The backward of an all-to-all is the reverse all-to-all (gather and scatter dimensions swapped).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_to_all"]


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` in ``world`` equal chunks along ``scatter_dim``, send chunk ``i`` to rank ``i``
    of ``group``, and concatenate the chunks received along ``gather_dim`` in rank order.

    ``x.shape[scatter_dim]`` must divide by the group size; the result has that dimension divided
    and ``gather_dim`` multiplied by the group size. Differentiable (backward is the reverse
    exchange). A group of one rank returns ``x`` unchanged.
    """
    ndim = x.dim()
    scatter_dim, gather_dim = scatter_dim % ndim, gather_dim % ndim
    world = dist.get_world_size(group)
    if x.shape[scatter_dim] % world:
        raise ValueError(
            f"all_to_all: x.shape[{scatter_dim}]={x.shape[scatter_dim]} must divide by the group size {world}; "
            "pad or choose a group size that divides it"
        )
    if world == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def _exchange(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    # all_to_all needs contiguous send and receive buffers (gloo and NCCL both copy raw storage).
    inputs = [chunk.contiguous() for chunk in x.chunk(world, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(world)]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None
