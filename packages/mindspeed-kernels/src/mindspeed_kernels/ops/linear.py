"""Dense linear layer ``x @ weight^T (+ bias)`` (the GEMM each backend runs fastest)."""

from __future__ import annotations

import torch

from mindspeed_kernels.ops._dispatch import call


def _describe(t) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """``x @ weight^T (+ bias)``, as ``torch.nn.functional.linear``.

    Shapes: ``x`` [..., K], ``weight`` [N, K], ``bias`` [N] or None -> [..., N] in ``x``'s dtype;
    all of one floating dtype and device, any strides (``w.t()`` of a [K, N] tensor computes
    ``x @ w``). The reference backend runs CPU float32 calls of at least 2^22 multiply-adds through
    oneDNN's GEMM (``MINDSPEED_CPU_GEMM=torch`` keeps torch's); the result equals torch's up to
    float32 rounding. Differentiable (once) in all three.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"linear: x must be a floating-point tensor with at least 1 dimension, got {_describe(x)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear: weight must be [N, K={x.shape[-1]}] to match x [..., K], got {_describe(weight)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"linear: bias must be None or [N={weight.shape[0]}], got {_describe(bias)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"linear: {name} ({t.dtype}, {t.device}) must have x's dtype and device ({x.dtype}, {x.device})")
    return call("linear", x, backend, x, weight, bias)
