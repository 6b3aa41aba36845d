"""Moving activations between the full layout ``[S, *, H]`` (the same on every rank) and the 2D
layout ``[S/P_s, *, H/P_h]``: rows block ``rank in seq_group`` of S, columns block
``rank in hidden_group`` of H.

A `ParallelLinear2D` with groups ``(ag, rs)`` takes ``seq_group=ag, hidden_group=rs`` and
returns ``seq_group=rs, hidden_group=ag``; a `RMSNorm2D`/`LayerNorm2D` keeps the layout and
reduces its statistics over ``hidden_group``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mindspeed_parallel.tp2d.comm import all_gather_first, all_gather_last, group_rank, group_size

__all__ = ["gather_2d", "shard_2d", "split_2d"]


def shard_2d(full: torch.Tensor, seq_index: int, seq_parts: int, hidden_index: int, hidden_parts: int) -> torch.Tensor:
    """Block ``(seq_index, hidden_index)`` of ``full [S, *, H]`` cut in ``seq_parts x hidden_parts``
    blocks: ``[S/seq_parts, *, H/hidden_parts]`` (a view). No communication."""
    rows, cols = full.shape[0], full.shape[-1]
    if rows % seq_parts or cols % hidden_parts:
        raise ValueError(
            f"shard_2d: full shape {tuple(full.shape)} needs dim 0 divisible by {seq_parts} and the last dim by {hidden_parts}"
        )
    r, c = rows // seq_parts, cols // hidden_parts
    return full[seq_index * r : (seq_index + 1) * r, ..., hidden_index * c : (hidden_index + 1) * c]


def _shard(full, seq_group, hidden_group):
    return shard_2d(full, group_rank(seq_group), group_size(seq_group), group_rank(hidden_group), group_size(hidden_group))


def _gather(local, seq_group, hidden_group):
    return all_gather_first(all_gather_last(local, hidden_group), seq_group)


class _Split2D(torch.autograd.Function):
    @staticmethod
    def forward(ctx, full, seq_group, hidden_group):
        ctx.groups = (seq_group, hidden_group)
        return _shard(full, seq_group, hidden_group).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad.contiguous(), *ctx.groups), None, None


class _Gather2D(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, seq_group, hidden_group):
        ctx.groups = (seq_group, hidden_group)
        return _gather(local.contiguous(), seq_group, hidden_group)

    @staticmethod
    def backward(ctx, grad):
        return _shard(grad, *ctx.groups).contiguous(), None, None


def split_2d(full: torch.Tensor, seq_group: dist.ProcessGroup, hidden_group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's block ``[S/P_s, *, H/P_h]`` of a ``full [S, *, H]`` that every rank holds.

    Differentiable: the backward all-gathers the block gradients, so each rank's ``full`` receives
    the complete gradient (Megatron's scatter-to-region convention)."""
    return _Split2D.apply(full, seq_group, hidden_group)


def gather_2d(local: torch.Tensor, seq_group: dist.ProcessGroup, hidden_group: dist.ProcessGroup) -> torch.Tensor:
    """Reassemble ``[S, *, H]`` on every rank from the blocks ``[S/P_s, *, H/P_h]``.

    Differentiable: the backward keeps this rank's block of the gradient, which assumes every
    rank computes the same function of the full tensor (Megatron's gather-from-region convention)."""
    return _Gather2D.apply(local, seq_group, hidden_group)
