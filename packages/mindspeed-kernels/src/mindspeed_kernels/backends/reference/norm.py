"""RMSNorm in plain torch with an analytic backward that keeps only ``x`` and ``1/rms`` alive."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _compute_dtype(x: torch.Tensor, compute_in_fp32: bool) -> torch.dtype:
    # float64 stays float64; only half precisions are widened.
    return torch.promote_types(x.dtype, torch.float32) if compute_in_fp32 else x.dtype


def _scale(weight: torch.Tensor | None, add_rmsnorm_offset: bool, dtype: torch.dtype) -> torch.Tensor | None:
    if weight is None:
        return None
    w = weight.to(dtype)
    return w + 1 if add_rmsnorm_offset else w


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, add_rmsnorm_offset, compute_in_fp32):
        dtype = _compute_dtype(x, compute_in_fp32)
        xc = x.to(dtype)
        rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
        y = xc * rstd
        w = _scale(weight, add_rmsnorm_offset, dtype)
        if w is not None:
            y = y * w
        ctx.save_for_backward(x, weight, rstd)
        ctx.flags = (add_rmsnorm_offset, dtype)
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        add_rmsnorm_offset, dtype = ctx.flags
        x_hat = x.to(dtype) * rstd
        g = grad_out.to(dtype)
        grad_weight = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (g * x_hat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        w = _scale(weight, add_rmsnorm_offset, dtype)
        g_hat = g * w if w is not None else g
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d(x * rstd): the rstd term removes the component of g_hat along x_hat.
            grad_x = (rstd * (g_hat - x_hat * (g_hat * x_hat).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None, None, None


def rms_norm(x, weight=None, eps=1e-6, *, add_rmsnorm_offset=False, compute_in_fp32=True):
    """See :func:`mindspeed_kernels.ops.rms_norm`."""
    return _RMSNorm.apply(x, weight, eps, add_rmsnorm_offset, compute_in_fp32)
