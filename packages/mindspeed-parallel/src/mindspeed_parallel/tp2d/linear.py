"""2D tensor-parallel linear layer: ``y = x @ W^T + b`` with both activations and weight split
over two process groups, an all-gather group ``ag`` (size A) and a reduce-scatter group ``rs``
(size R). This rank's coordinates are ``a = rank in ag`` and ``r = rank in rs``.

Layouts (S = the full first dimension, usually the sequence; ``*`` = any middle dimensions)::

    input   x   [S/A, *, IN/R]    rows block a of S,   columns block r of IN
    weight  W   [OUT/A, IN/R]     W[block a of OUT, block r of IN]
    bias    b   [OUT/A]           b[block a]            (the same on the R ranks of an rs group)
    output  y   [S/R, *, OUT/A]   rows block r of S,   columns block a of OUT

Forward: all-gather ``x`` over ``ag`` along dim 0 -> ``[S, *, IN/R]``; multiply by the local
weight -> ``[S, *, OUT/A]``, a partial sum over the IN blocks; reduce-scatter over ``rs`` along
dim 0 -> ``[S/R, *, OUT/A]``; add the bias. Backward mirrors it: all-gather the output gradient
over ``rs``, multiply by W, reduce-scatter over ``ag``; the weight and bias gradients are
complete on every rank (no further reduction needed). The input is re-gathered in backward
instead of being kept gathered, as MindSpeed does, to save activation memory.

The output layout is the input layout with the roles of the two groups swapped, so a layer with
``(ag, rs) = (x, y)`` feeds a layer with ``(ag, rs) = (y, x)`` directly (see `mindspeed_parallel.tp2d`).

Overlap options (`TP2DOverlap`), all giving the same numbers as the plain path:

- ``ag_with_matmul``: the all-gather becomes a ring of send/recv steps; each arriving block of
  ``x`` is multiplied while the next one is in flight.
- ``matmul_with_rs``: the matmul is cut into ``chunks`` row chunks, each reduce-scattered
  asynchronously while the next chunk is multiplied. Chunk ``k`` holds the ``k``-th sub-block of
  every rank's destination block, so the concatenated results are exactly the plain layout.
- ``backward_ag_with_matmul``: in backward, the all-gather of the output gradient is the ring,
  overlapped with the input-gradient matmul of each block.

``ag_with_matmul`` and ``matmul_with_rs`` are alternatives (MindSpeed allows one forward overlap
at a time); either combines with ``backward_ag_with_matmul``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mindspeed_parallel.tp2d.comm import (
    all_gather_first,
    group_rank,
    group_size,
    reduce_scatter_first,
    ring_exchange,
)

__all__ = ["ParallelLinear2D", "TP2DOverlap", "linear_2d", "shard_linear_2d"]


def copy_shards_(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """Copy a weight shard (and bias shard, when not None) into ``layer`` in place; returns ``layer``."""
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def init_weight_(weight: torch.Tensor, fan_in: int, init_method: Callable | None) -> None:
    """Initialise a weight shard in place: ``init_method(weight)``, else U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) with ``fan_in`` the full layer's input size (nn.Linear's bias-free bound)."""
    with torch.no_grad():
        if init_method is not None:
            init_method(weight)
        else:
            bound = 1.0 / math.sqrt(fan_in)
            weight.uniform_(-bound, bound)


@dataclass(frozen=True)
class TP2DOverlap:
    """Which communications of `linear_2d` overlap computation (seed flags in brackets).

    ag_with_matmul:          forward all-gather as a ring, overlapped with the matmul
                             [enable-overlap-ag-with-matmul].
    matmul_with_rs:          forward matmul in chunks, each reduce-scattered while the next is
                             computed [enable-overlap-matmul-with-rs].
    backward_ag_with_matmul: backward all-gather of the output gradient as a ring, overlapped with
                             the input-gradient matmul [enable-backward-overlap-ag-with-matmul].
    chunks:                  number of chunks for ``matmul_with_rs``; None = the rs group size.
    """

    ag_with_matmul: bool = False
    matmul_with_rs: bool = False
    backward_ag_with_matmul: bool = False
    chunks: int | None = None

    def __post_init__(self) -> None:
        if self.ag_with_matmul and self.matmul_with_rs:
            raise ValueError(
                "TP2DOverlap: ag_with_matmul and matmul_with_rs cannot both be on (one forward overlap at a time); pick one"
            )
        if self.chunks is not None and self.chunks < 1:
            raise ValueError(f"TP2DOverlap: chunks={self.chunks} must be >= 1 (or None for the rs group size)")


def _check_shapes(x: torch.Tensor, weight: torch.Tensor, bias, ag_size: int, rs_size: int, chunks: int) -> None:
    if x.dim() < 2:
        raise ValueError(f"linear_2d: x must have at least 2 dims [S/A, *, IN/R], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"linear_2d: weight shape {tuple(weight.shape)} must be [OUT/A, IN/R] with IN/R = x.shape[-1] = {x.shape[-1]}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_2d: bias shape {tuple(bias.shape)} must be [OUT/A] = ({weight.shape[0]},)")
    rows = x.shape[0] * ag_size
    if rows % (rs_size * chunks):
        raise ValueError(
            f"linear_2d: the gathered first dim S = {rows} must divide by rs group size * chunks = {rs_size} * {chunks}; "
            "pad the sequence or change tp_x/tp_y (or TP2DOverlap.chunks)"
        )


def _ring_gather_matmul(local: torch.Tensor, right: torch.Tensor, group: dist.ProcessGroup, keep_gathered: bool):
    """All-gather ``local`` over ``group`` along dim 0 as a ring, multiplying each block by
    ``right`` while the next block travels. Returns ``(gathered or None, gathered @ right)``."""
    size = group_size(group)
    products: list = [None] * size
    blocks: list = [None] * size
    for source, block in ring_exchange(local, group):
        products[source] = torch.matmul(block, right)
        if keep_gathered:
            blocks[source] = block
    gathered = torch.cat(blocks, dim=0) if keep_gathered else None
    return gathered, torch.cat(products, dim=0)


def _chunked_matmul_reduce_scatter(total: torch.Tensor, right: torch.Tensor, group: dist.ProcessGroup, chunks: int):
    """``reduce_scatter_first(total @ right, group)`` computed chunk by chunk, each chunk's
    reduce-scatter running while the next chunk is multiplied."""
    size = group_size(group)
    block = total.shape[0] // size
    sub = block // chunks
    # [R, chunks, sub, ...]: chunk k = the k-th sub-block of every rank's destination block.
    view = total.reshape(size, chunks, sub, *total.shape[1:])
    results, pending = [], []
    for k in range(chunks):
        product = torch.matmul(view[:, k].reshape(size * sub, *total.shape[1:]), right)
        result, handle = reduce_scatter_first(product, group, async_op=True)
        results.append(result)
        pending.append((handle, product))  # the product must stay alive until its handle is waited on
    for handle, _ in pending:
        handle.wait()
    return torch.cat(results, dim=0)


class _Linear2D(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, ag_group, rs_group, overlap: TP2DOverlap, chunks: int):
        ctx.save_for_backward(x, weight)
        ctx.ag_group, ctx.rs_group, ctx.overlap, ctx.has_bias = ag_group, rs_group, overlap, bias is not None
        right = weight.t()
        if overlap.matmul_with_rs:
            out = _chunked_matmul_reduce_scatter(all_gather_first(x, ag_group), right, rs_group, chunks)
        else:
            if overlap.ag_with_matmul:
                _, partial = _ring_gather_matmul(x, right, ag_group, keep_gathered=False)
            else:
                partial = torch.matmul(all_gather_first(x, ag_group), right)
            out = reduce_scatter_first(partial, rs_group)
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        # The input gather (for the weight gradient) runs while the input-gradient matmul does.
        x_total, x_handle = all_gather_first(x, ctx.ag_group, async_op=True)
        if ctx.overlap.backward_ag_with_matmul:
            grad_total, grad_partial = _ring_gather_matmul(grad_out, weight, ctx.rs_group, keep_gathered=True)
        else:
            grad_total = all_gather_first(grad_out, ctx.rs_group)
            grad_partial = torch.matmul(grad_total, weight)
        grad_x, rs_handle = reduce_scatter_first(grad_partial, ctx.ag_group, async_op=True)
        grad_rows = grad_total.reshape(-1, grad_total.shape[-1])
        x_handle.wait()
        grad_weight = grad_rows.t().matmul(x_total.reshape(-1, x_total.shape[-1]))
        grad_bias = grad_rows.sum(dim=0) if ctx.has_bias else None
        rs_handle.wait()
        return grad_x, grad_weight, grad_bias, None, None, None, None


def linear_2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ag_group: dist.ProcessGroup,
    rs_group: dist.ProcessGroup,
    overlap: TP2DOverlap | None = None,
) -> torch.Tensor:
    """2D tensor-parallel ``x @ W^T + b``: ``[S/A, *, IN/R] -> [S/R, *, OUT/A]`` (module docstring
    has the layouts). Differentiable in ``x``, ``weight`` and ``bias``; every rank of both groups
    must call it with matching shapes."""
    overlap = overlap or TP2DOverlap()
    ag_size, rs_size = group_size(ag_group), group_size(rs_group)
    chunks = (overlap.chunks or rs_size) if overlap.matmul_with_rs else 1
    _check_shapes(x, weight, bias, ag_size, rs_size, chunks)
    return _Linear2D.apply(x, weight, bias, ag_group, rs_group, overlap, chunks)


def shard_linear_2d(
    weight: torch.Tensor, bias: torch.Tensor | None, ag_index: int, ag_size: int, rs_index: int, rs_size: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's ``(W[block ag_index of OUT, block rs_index of IN], b[block ag_index])`` of a full
    ``weight [OUT, IN]`` and ``bias [OUT]`` (bias may be None). Returns contiguous copies."""
    out_features, in_features = weight.shape
    if out_features % ag_size or in_features % rs_size:
        raise ValueError(
            f"shard_linear_2d: weight [OUT={out_features}, IN={in_features}] needs OUT divisible by the ag size {ag_size} "
            f"and IN by the rs size {rs_size}"
        )
    rows, cols = out_features // ag_size, in_features // rs_size
    w = weight[ag_index * rows : (ag_index + 1) * rows, rs_index * cols : (rs_index + 1) * cols].clone()
    b = None if bias is None else bias[ag_index * rows : (ag_index + 1) * rows].clone()
    return w, b


class ParallelLinear2D(nn.Module):
    """Linear layer of ``in_features -> out_features`` whose weight is split over an ``ag`` x ``rs``
    grid (see the module docstring for the layouts; `linear_2d` for the computation).

    Holds ``weight [out_features/A, in_features/R]`` and ``bias [out_features/A]`` (zeros, as
    Megatron initialises biases). ``init_method(weight_shard)`` initialises the shard; by default it
    is uniform in ``+-1/sqrt(in_features)``, the full layer's ``nn.Linear`` bound. The bias is the
    same on the R ranks of an rs group and gets the same (complete) gradient on each.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        ag_group: dist.ProcessGroup,
        rs_group: dist.ProcessGroup,
        bias: bool = True,
        overlap: TP2DOverlap | None = None,
        init_method: Callable[[torch.Tensor], object] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        ag_size, rs_size = group_size(ag_group), group_size(rs_group)
        if out_features % ag_size:
            raise ValueError(f"ParallelLinear2D: out_features={out_features} must divide by the ag group size {ag_size}")
        if in_features % rs_size:
            raise ValueError(f"ParallelLinear2D: in_features={in_features} must divide by the rs group size {rs_size}")
        self.in_features, self.out_features = in_features, out_features
        self.ag_group, self.rs_group = ag_group, rs_group
        self.overlap = overlap or TP2DOverlap()
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features // ag_size, in_features // rs_size, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features // ag_size, **factory)) if bias else None
        init_weight_(self.weight, in_features, init_method)

    @classmethod
    def from_full(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        ag_group: dist.ProcessGroup,
        rs_group: dist.ProcessGroup,
        overlap: TP2DOverlap | None = None,
    ) -> ParallelLinear2D:
        """This rank's shard of the full layer ``weight [OUT, IN]``, ``bias [OUT]`` (or None)."""
        out_features, in_features = weight.shape
        layer = cls(
            in_features, out_features, ag_group=ag_group, rs_group=rs_group, bias=bias is not None,
            overlap=overlap, device=weight.device, dtype=weight.dtype, init_method=lambda _: None,
        )  # fmt: skip
        w, b = shard_linear_2d(
            weight, bias, group_rank(ag_group), group_size(ag_group), group_rank(rs_group), group_size(rs_group)
        )
        return copy_shards_(layer, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[S/A, *, in_features/R] -> [S/R, *, out_features/A]``."""
        return linear_2d(x, self.weight, self.bias, self.ag_group, self.rs_group, self.overlap)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"ag={group_size(self.ag_group)}, rs={group_size(self.rs_group)}, overlap={self.overlap}"
        )
