"""RMSNorm (torch_npu ``npu_rms_norm``)."""

from __future__ import annotations

import math

import torch

from mindspeed_kernels.ops._dispatch import call


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    add_rmsnorm_offset: bool = False,
    compute_in_fp32: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Root-mean-square normalisation over the last dimension.

    ``y = x / sqrt(mean(x**2, -1) + eps) * w`` with ``w = weight`` or, with
    ``add_rmsnorm_offset`` (Gemma / Qwen3-Next style), ``w = 1 + weight``.

    Shapes: ``x`` [..., H]; ``weight`` [H] or None (no scaling; ``add_rmsnorm_offset`` then
    needs a weight and is an error without one). Returns ``x``'s shape and dtype.
    ``compute_in_fp32`` (default) computes statistics, normalisation and scaling in float32 for
    half-precision inputs and casts the result back, as ``npu_rms_norm`` does; False computes in
    ``x.dtype`` (the weight is cast to it). ``eps`` is a finite number >= 0. Differentiable
    (once) in ``x`` and ``weight``; the weight's gradient has the weight's dtype.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"rms_norm: x must be a floating-point tensor with at least 1 dimension, got {got}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise TypeError(f"rms_norm: weight must be a floating-point tensor or None, got {got}")
        if tuple(weight.shape) != (x.shape[-1],):
            raise ValueError(
                f"rms_norm: weight.shape={tuple(weight.shape)} must be ({x.shape[-1]},), the last dimension of x"
            )
        if weight.device != x.device:
            raise ValueError(f"rms_norm: weight is on {weight.device} but x is on {x.device}; move them to one device")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"rms_norm: eps={eps!r} must be a finite number >= 0 (e.g. 1e-6)")
    for name, flag in (("add_rmsnorm_offset", add_rmsnorm_offset), ("compute_in_fp32", compute_in_fp32)):
        if not isinstance(flag, bool):
            raise TypeError(f"rms_norm: {name}={flag!r} must be True or False")
    if add_rmsnorm_offset and weight is None:
        raise ValueError("rms_norm: add_rmsnorm_offset=True scales by 1 + weight but weight is None; pass a weight")
    return call(
        "rms_norm", x, backend, x, weight, eps, add_rmsnorm_offset=add_rmsnorm_offset, compute_in_fp32=compute_in_fp32
    )
