"""NDMM: a tensor-parallel linear whose weight is split over a ``d1 x d2`` grid of the TP group
(seed flags ``--use-nd-matmul --nd1-dim1-size --nd2-dim1-size``).

The TP group (``tp = d1 * d2`` ranks) is the grid of `mindspeed_parallel.tp2d.make_tp2d_groups`
with ``tp_x = d1``: ``dim1_group`` = the x group (``d1`` consecutive ranks), ``dim2_group`` = the
y group. A rank's TP index is ``t = j * d1 + i`` with ``i = rank in dim1_group`` and
``j = rank in dim2_group``. A transformer uses two grids: ``d1 = nd1-dim1-size`` for the first
matmul of a block (QKV, fc1) and ``d1 = nd2-dim1-size`` for the second (proj, fc2).

Layouts (``*`` = any leading dims, e.g. ``[S, B]``; every rank sees all tokens)::

    input   x   [*, IN/tp]     columns block t of IN     (Megatron's "split last dim over TP")
    weight  W   [OUT/d1, IN/d2]
    bias    b   [OUT/tp]       block t of OUT
    output  y   [*, OUT/tp]    columns block t of OUT    (the same layout, so NDMM layers chain)

The weight shard of rank (i, j) is, as in MindSpeed's layout: columns block ``j`` of IN (size
IN/d2), and rows = the OUT/tp blocks ``i, i + d1, i + 2*d1, ...`` (d2 of them) stacked. So::

    forward   all-gather x over dim1 (last dim)      -> [*, IN/d2]   block j of IN
              @ W^T                                  -> [*, OUT/d1]  partial sum over the j blocks
              reduce-scatter over dim2 (last dim)    -> [*, OUT/tp]  block j*d1 + i = t of OUT
    backward  all-gather dy over dim2, @ W, reduce-scatter over dim1 -> dx [*, IN/tp];
              dW = gathered dy^T @ gathered x (complete); db = sum of dy (complete).

Norms between NDMM layers reduce their statistics over the whole TP group
(`mindspeed_parallel.tp2d.RMSNorm2D` with ``group`` = the TP group). Not combinable with
sequence parallelism (as in MindSpeed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from mindspeed_parallel.tp2d.comm import all_gather_last, group_rank, group_size, reduce_scatter_last
from mindspeed_parallel.tp2d.groups import TP2DGroups, make_tp2d_groups
from mindspeed_parallel.tp2d.linear import copy_shards_, init_weight_

__all__ = ["NdParallelLinear", "make_ndmm_groups", "nd_linear", "shard_nd_linear", "split_nd", "gather_nd"]


def make_ndmm_groups(tp_ranks: Sequence[int], dim1_size: int) -> TP2DGroups:
    """This rank's ``dim1`` (= ``x_group``) and ``dim2`` (= ``y_group``) groups for
    ``nd*-dim1-size = dim1_size`` over the TP group ``tp_ranks`` (collective over ``tp_ranks``)."""
    if dim1_size < 1 or len(tp_ranks) % dim1_size:
        raise ValueError(f"make_ndmm_groups: dim1_size={dim1_size} must divide the tensor-parallel size {len(tp_ranks)}")
    return make_tp2d_groups(tp_ranks, dim1_size, len(tp_ranks) // dim1_size)


def _tp_index(dim1_group, dim2_group) -> tuple[int, int]:
    """``(t, tp)``: this rank's TP index and the TP size of the grid."""
    d1 = group_size(dim1_group)
    return group_rank(dim2_group) * d1 + group_rank(dim1_group), d1 * group_size(dim2_group)


def shard_nd_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, dim1_index: int, dim1_size: int, dim2_index: int, dim2_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rank ``(dim1_index, dim2_index)``'s ``(W [OUT/d1, IN/d2], b [OUT/tp])`` of a full
    ``weight [OUT, IN]`` and ``bias [OUT]`` (or None). Returns contiguous copies."""
    out_features, in_features = weight.shape
    tp = dim1_size * dim2_size
    if out_features % tp or in_features % tp:
        raise ValueError(f"shard_nd_linear: weight [OUT={out_features}, IN={in_features}] needs OUT and IN divisible by tp={tp}")
    block, cols = out_features // tp, in_features // dim2_size
    columns = weight[:, dim2_index * cols : (dim2_index + 1) * cols]
    row_blocks = [
        columns[(m * dim1_size + dim1_index) * block : (m * dim1_size + dim1_index + 1) * block] for m in range(dim2_size)
    ]
    t = dim2_index * dim1_size + dim1_index
    b = None if bias is None else bias[t * block : (t + 1) * block].clone()
    return torch.cat(row_blocks, dim=0).contiguous(), b


class _NdLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dim1_group, dim2_group):
        ctx.save_for_backward(x, weight)
        ctx.groups, ctx.has_bias = (dim1_group, dim2_group), bias is not None
        partial = torch.matmul(all_gather_last(x.contiguous(), dim1_group), weight.t())
        out = reduce_scatter_last(partial, dim2_group)
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        dim1_group, dim2_group = ctx.groups
        grad_total = all_gather_last(grad_out.contiguous(), dim2_group)  # [*, OUT/d1]
        grad_x = reduce_scatter_last(torch.matmul(grad_total, weight), dim1_group)
        x_total = all_gather_last(x.contiguous(), dim1_group)  # [*, IN/d2]
        grad_rows = grad_total.reshape(-1, grad_total.shape[-1])
        grad_weight = grad_rows.t().matmul(x_total.reshape(-1, x_total.shape[-1]))
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(dim=0) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None, None


def nd_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dim1_group: dist.ProcessGroup, dim2_group: dist.ProcessGroup
) -> torch.Tensor:
    """NDMM ``x @ W^T + b``: ``[*, IN/tp] -> [*, OUT/tp]`` (module docstring has the layouts).
    Differentiable in ``x``, ``weight`` and ``bias``; every rank of the grid must call it."""
    d1, d2 = group_size(dim1_group), group_size(dim2_group)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] * d1:
        raise ValueError(
            f"nd_linear: weight {tuple(weight.shape)} must be [OUT/d1, IN/d2] with IN/d2 = d1 * x.shape[-1] = {d1 * x.shape[-1]}"
        )
    if weight.shape[0] % d2:
        raise ValueError(f"nd_linear: weight rows OUT/d1 = {weight.shape[0]} must divide by the dim2 size {d2}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0] // d2,):
        raise ValueError(f"nd_linear: bias shape {tuple(bias.shape)} must be [OUT/tp] = ({weight.shape[0] // d2},)")
    return _NdLinear.apply(x, weight, bias, dim1_group, dim2_group)


class NdParallelLinear(nn.Module):
    """Linear ``in_features -> out_features`` with the NDMM weight split (`nd_linear`).

    Holds ``weight [out/d1, in/d2]`` (uniform in ``+-1/sqrt(in_features)`` unless ``init_method``)
    and ``bias [out/tp]`` (zeros). Both are unique to this rank; their gradients are complete.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dim1_group: dist.ProcessGroup,
        dim2_group: dist.ProcessGroup,
        bias: bool = True,
        init_method: Callable[[torch.Tensor], object] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        d1, d2 = group_size(dim1_group), group_size(dim2_group)
        if in_features % (d1 * d2) or out_features % (d1 * d2):
            raise ValueError(
                f"NdParallelLinear: in_features={in_features} and out_features={out_features} must divide by tp = {d1} * {d2}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.dim1_group, self.dim2_group = dim1_group, dim2_group
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features // d1, in_features // d2, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features // (d1 * d2), **factory)) if bias else None
        init_weight_(self.weight, in_features, init_method)

    @classmethod
    def from_full(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, *, dim1_group: dist.ProcessGroup, dim2_group: dist.ProcessGroup
    ) -> NdParallelLinear:
        """This rank's shard of the full layer ``weight [OUT, IN]``, ``bias [OUT]`` (or None)."""
        out_features, in_features = weight.shape
        layer = cls(
            in_features, out_features, dim1_group=dim1_group, dim2_group=dim2_group, bias=bias is not None,
            device=weight.device, dtype=weight.dtype, init_method=lambda _: None,
        )  # fmt: skip
        args = (group_rank(dim1_group), group_size(dim1_group), group_rank(dim2_group), group_size(dim2_group))
        return copy_shards_(layer, *shard_nd_linear(weight, bias, *args))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*, in_features/tp] -> [*, out_features/tp]``."""
        return nd_linear(x, self.weight, self.bias, self.dim1_group, self.dim2_group)

    def extra_repr(self) -> str:
        d1, d2 = group_size(self.dim1_group), group_size(self.dim2_group)
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, d1={d1}, d2={d2}"


class _SplitNd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, full, dim1_group, dim2_group):
        ctx.groups = (dim1_group, dim2_group)
        t, tp = _tp_index(dim1_group, dim2_group)
        return full.chunk(tp, dim=-1)[t].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _gather_nd(grad.contiguous(), *ctx.groups), None, None


def _gather_nd(local, dim1_group, dim2_group):
    # Block t = j*d1 + i: gathering over dim1 first gives blocks j*d1 .. j*d1+d1-1 in order,
    # then over dim2 the j-ordered groups of those.
    return all_gather_last(all_gather_last(local, dim1_group), dim2_group)


class _GatherNd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, dim1_group, dim2_group):
        ctx.groups = (dim1_group, dim2_group)
        return _gather_nd(local.contiguous(), dim1_group, dim2_group)

    @staticmethod
    def backward(ctx, grad):
        t, tp = _tp_index(*ctx.groups)
        return grad.chunk(tp, dim=-1)[t].contiguous(), None, None


def split_nd(full: torch.Tensor, dim1_group: dist.ProcessGroup, dim2_group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's block ``t`` of the last dim of ``full [*, H]`` (held by every rank): ``[*, H/tp]``.
    Differentiable (backward all-gathers, as Megatron's scatter-to-region)."""
    tp = group_size(dim1_group) * group_size(dim2_group)
    if full.shape[-1] % tp:
        raise ValueError(f"split_nd: last dim {full.shape[-1]} must divide by tp={tp}")
    return _SplitNd.apply(full, dim1_group, dim2_group)


def gather_nd(local: torch.Tensor, dim1_group: dist.ProcessGroup, dim2_group: dist.ProcessGroup) -> torch.Tensor:
    """Reassemble ``[*, H]`` on every rank from the blocks ``[*, H/tp]`` (backward keeps this
    rank's block, as Megatron's gather-from-region)."""
    return _GatherNd.apply(local, dim1_group, dim2_group)
