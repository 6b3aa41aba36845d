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
    # Each step writes into a tensor the step before allocated where it can: on a CPU a fresh
    # activation-sized temporary costs more than the arithmetic on it (memory the caches and the
    # page tables have not seen), so forward allocates one and backward two.
    @staticmethod
    def forward(ctx, x, weight, eps, add_rmsnorm_offset, compute_in_fp32):
        dtype = _compute_dtype(x, compute_in_fp32)
        xc = x.to(dtype)
        y = xc.pow(2)
        rstd = torch.rsqrt(y.mean(-1, keepdim=True) + eps)
        torch.mul(xc, rstd, out=y)
        w = _scale(weight, add_rmsnorm_offset, dtype)
        if w is not None:
            y.mul_(w)
        ctx.save_for_backward(x, weight, rstd)
        ctx.flags = (add_rmsnorm_offset, dtype)
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        add_rmsnorm_offset, dtype = ctx.flags
        hidden = x.shape[-1]
        x_hat = x.to(dtype) * rstd
        g = grad_out.to(dtype)
        buf = g * x_hat
        grad_weight = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = buf.reshape(-1, hidden).sum(0).to(weight.dtype)
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None, None, None
        # d(x * rstd): the rstd term removes the component of g_hat = g * w along x_hat, so
        # grad_x = rstd * (g_hat - x_hat * mean(g_hat * x_hat)), with mean(g_hat * x_hat) = (g * x_hat) @ w / H.
        w = _scale(weight, add_rmsnorm_offset, dtype)
        if w is None:
            dot = buf.mean(-1, keepdim=True)
            torch.addcmul(g, x_hat, dot, value=-1, out=buf)
        else:
            dot = torch.mv(buf.reshape(-1, hidden), w).div_(hidden).view(rstd.shape)
            torch.mul(g, w, out=buf).addcmul_(x_hat, dot, value=-1)
        return buf.mul_(rstd).to(x.dtype), grad_weight, None, None, None


def rms_norm(x, weight=None, eps=1e-6, *, add_rmsnorm_offset=False, compute_in_fp32=True):
    """See :func:`mindspeed_kernels.ops.rms_norm`."""
    return _RMSNorm.apply(x, weight, eps, add_rmsnorm_offset, compute_in_fp32)
