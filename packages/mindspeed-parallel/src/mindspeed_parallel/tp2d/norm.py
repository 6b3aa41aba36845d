"""RMSNorm and LayerNorm over a hidden dimension split across a process group.

Input ``x [*, H/P]`` holds columns block ``rank in group`` of every token's hidden vector (TP-2D:
the y group; NDMM: the whole TP group). Per-token statistics are combined over ``group``, so the
output ``[*, H/P]`` is exactly this rank's block of the norm of the full vectors. The weight
(and bias) hold block ``rank in group`` of the full ``[H]`` parameters.

Communication per call: RMSNorm one all-reduce of ``[*, 1]`` forward and one backward;
LayerNorm one all-gather of per-rank (mean, M2) forward, combined with Chan's parallel-variance
formula (as stable as a two-pass variance, unlike ``E[x^2] - E[x]^2``), and one all-reduce of
``[*, 2]`` backward.

Weight gradients: when the tokens themselves are split over another group (TP-2D splits the
sequence over the x group), each rank's weight gradient covers only its tokens. Pass that group
as ``grad_reduce_group`` to have the backward sum the weight/bias gradients over it; leave it None
when every rank sees all tokens (NDMM) or when the training loop reduces them itself.

Computation runs in float32 for half-precision inputs (float64 stays float64); the output has
``x``'s dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mindspeed_parallel.tp2d.comm import all_gather_first, all_reduce_sum, group_rank, group_size

__all__ = ["LayerNorm2D", "RMSNorm2D", "layer_norm_2d", "rms_norm_2d"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _sum_leading(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).sum(dim=0)


def _reduce_param_grads(grads: list, group) -> list:
    if group is not None:
        for g in grads:
            all_reduce_sum(g, group)
    return grads


class _RMSNorm2D(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, group, eps, hidden, grad_group):
        xc = x.to(_compute_dtype(x.dtype))
        sum_sq = all_reduce_sum((xc * xc).sum(dim=-1, keepdim=True), group)
        rstd = torch.rsqrt(sum_sq / hidden + eps)
        ctx.save_for_backward(xc, weight, rstd)
        ctx.group, ctx.hidden, ctx.grad_group = group, hidden, grad_group
        return (xc * rstd * weight.to(xc.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xc, weight, rstd = ctx.saved_tensors
        g = grad_out.to(xc.dtype)
        gx = g * weight.to(xc.dtype)
        dot = all_reduce_sum((gx * xc).sum(dim=-1, keepdim=True), ctx.group)
        # d/dx [x * rstd] contracted with gx: rstd * (gx - x * rstd^2 * <gx, x> / H)
        grad_x = rstd * (gx - xc * (rstd * rstd) * dot / ctx.hidden)
        (grad_w,) = _reduce_param_grads([_sum_leading(g * xc * rstd)], ctx.grad_group)
        return grad_x.to(grad_out.dtype), grad_w.to(weight.dtype), None, None, None, None


class _LayerNorm2D(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group, eps, hidden, grad_group):
        xc = x.to(_compute_dtype(x.dtype))
        n_local = xc.shape[-1]
        mean_local = xc.mean(dim=-1)
        m2_local = ((xc - mean_local.unsqueeze(-1)) ** 2).sum(dim=-1)
        stats = all_gather_first(torch.stack([mean_local, m2_local]), group)  # [2P, *]
        stats = stats.reshape(group_size(group), 2, *mean_local.shape)
        mean = stats[:, 0].mean(dim=0)
        # Chan et al.: M2 = sum_p M2_p + n_p * sum_p (mean_p - mean)^2 for equal block sizes n_p.
        m2 = stats[:, 1].sum(dim=0) + n_local * ((stats[:, 0] - mean) ** 2).sum(dim=0)
        rstd = torch.rsqrt(m2 / hidden + eps).unsqueeze(-1)
        xhat = (xc - mean.unsqueeze(-1)) * rstd
        ctx.save_for_backward(xhat, weight, rstd)
        ctx.group, ctx.hidden, ctx.grad_group, ctx.has_bias = group, hidden, grad_group, bias is not None
        out = xhat * weight.to(xc.dtype)
        if bias is not None:
            out = out + bias.to(xc.dtype)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xhat, weight, rstd = ctx.saved_tensors
        g = grad_out.to(xhat.dtype)
        gx = g * weight.to(xhat.dtype)
        sums = all_reduce_sum(torch.stack([gx.sum(dim=-1), (gx * xhat).sum(dim=-1)], dim=-1), ctx.group)
        mean_g, mean_gx = (sums[..., 0:1] / ctx.hidden), (sums[..., 1:2] / ctx.hidden)
        grad_x = rstd * (gx - mean_g - xhat * mean_gx)
        param_grads = [_sum_leading(g * xhat)] + ([_sum_leading(g)] if ctx.has_bias else [])
        param_grads = _reduce_param_grads(param_grads, ctx.grad_group)
        grad_b = param_grads[1].to(weight.dtype) if ctx.has_bias else None
        return grad_x.to(grad_out.dtype), param_grads[0].to(weight.dtype), grad_b, None, None, None, None


def _check(x: torch.Tensor, weight: torch.Tensor, hidden: int, group, name: str) -> None:
    size = group_size(group)
    if hidden % size:
        raise ValueError(f"{name}: hidden_size={hidden} must divide by the group size {size}")
    if x.shape[-1] != hidden // size or tuple(weight.shape) != (hidden // size,):
        raise ValueError(
            f"{name}: x last dim {x.shape[-1]} and weight shape {tuple(weight.shape)} must both be H/P = {hidden // size}"
        )


def rms_norm_2d(
    x: torch.Tensor, weight: torch.Tensor, group: dist.ProcessGroup, eps: float = 1e-6,
    grad_reduce_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:  # fmt: skip
    """``x * rsqrt(mean(x_full^2) + eps) * weight`` for ``x [*, H/P]``, ``weight [H/P]``; the mean
    is over the full hidden size ``H = P * x.shape[-1]`` (module docstring for the gradients)."""
    hidden = x.shape[-1] * group_size(group)
    _check(x, weight, hidden, group, "rms_norm_2d")
    return _RMSNorm2D.apply(x, weight, group, eps, hidden, grad_reduce_group)


def layer_norm_2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group: dist.ProcessGroup, eps: float = 1e-5,
    grad_reduce_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:  # fmt: skip
    """``(x - mean) * rsqrt(var + eps) * weight + bias`` with mean and (biased) variance over the
    full hidden vector; ``x [*, H/P]``, ``weight``/``bias [H/P]``."""
    hidden = x.shape[-1] * group_size(group)
    _check(x, weight, hidden, group, "layer_norm_2d")
    if bias is not None and bias.shape != weight.shape:
        raise ValueError(f"layer_norm_2d: bias shape {tuple(bias.shape)} must equal weight shape {tuple(weight.shape)}")
    return _LayerNorm2D.apply(x, weight, bias, group, eps, hidden, grad_reduce_group)


class _Norm2D(nn.Module):
    def __init__(self, hidden_size, group, eps, grad_reduce_group, device, dtype, bias: bool) -> None:
        super().__init__()
        size = group_size(group)
        if hidden_size % size:
            raise ValueError(f"{type(self).__name__}: hidden_size={hidden_size} must divide by the group size {size}")
        self.hidden_size, self.eps = hidden_size, eps
        self.group, self.grad_reduce_group = group, grad_reduce_group
        self.weight = nn.Parameter(torch.ones(hidden_size // size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size // size, device=device, dtype=dtype)) if bias else None

    def _load_full(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        size, rank = group_size(self.group), group_rank(self.group)
        block = self.hidden_size // size
        with torch.no_grad():
            self.weight.copy_(weight[rank * block : (rank + 1) * block])
            if bias is not None:
                self.bias.copy_(bias[rank * block : (rank + 1) * block])

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, eps={self.eps}, group_size={group_size(self.group)}"


class RMSNorm2D(_Norm2D):
    """RMSNorm over ``hidden_size`` split across ``group``: ``[*, H/P] -> [*, H/P]``, weight ``[H/P]``
    (ones). ``grad_reduce_group``: see the module docstring."""

    def __init__(self, hidden_size: int, group: dist.ProcessGroup, eps: float = 1e-6, *,
                 grad_reduce_group: dist.ProcessGroup | None = None, device=None, dtype=None) -> None:  # fmt: skip
        super().__init__(hidden_size, group, eps, grad_reduce_group, device, dtype, bias=False)

    @classmethod
    def from_full(cls, weight: torch.Tensor, group: dist.ProcessGroup, eps: float = 1e-6, *,
                  grad_reduce_group: dist.ProcessGroup | None = None) -> RMSNorm2D:  # fmt: skip
        """This rank's block of a full ``weight [H]``."""
        norm = cls(weight.shape[0], group, eps, grad_reduce_group=grad_reduce_group, device=weight.device, dtype=weight.dtype)
        norm._load_full(weight, None)
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_2d(x, self.weight, self.group, self.eps, self.grad_reduce_group)


class LayerNorm2D(_Norm2D):
    """LayerNorm over ``hidden_size`` split across ``group``: ``[*, H/P] -> [*, H/P]``, weight
    ``[H/P]`` (ones) and bias ``[H/P]`` (zeros) unless ``bias=False``."""

    def __init__(self, hidden_size: int, group: dist.ProcessGroup, eps: float = 1e-5, *, bias: bool = True,
                 grad_reduce_group: dist.ProcessGroup | None = None, device=None, dtype=None) -> None:  # fmt: skip
        super().__init__(hidden_size, group, eps, grad_reduce_group, device, dtype, bias=bias)

    @classmethod
    def from_full(cls, weight: torch.Tensor, bias: torch.Tensor | None, group: dist.ProcessGroup, eps: float = 1e-5, *,
                  grad_reduce_group: dist.ProcessGroup | None = None) -> LayerNorm2D:  # fmt: skip
        """This rank's blocks of a full ``weight [H]`` and ``bias [H]`` (or None)."""
        norm = cls(weight.shape[0], group, eps, bias=bias is not None, grad_reduce_group=grad_reduce_group,
                   device=weight.device, dtype=weight.dtype)  # fmt: skip
        norm._load_full(weight, bias)
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_2d(x, self.weight, self.bias, self.group, self.eps, self.grad_reduce_group)
