"""Gated activations on a concatenated [gate | up] tensor (torch_npu ``npu_swiglu``, ``npu_geglu``)."""

from __future__ import annotations

import torch

from mindspeed_kernels.ops._dispatch import call

APPROXIMATIONS = ("none", "tanh")


def _check_gated_input(op: str, x: torch.Tensor, dim: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{op}: x must be a floating-point tensor, got {got}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{op}: dim={dim!r} is out of range for x with {x.dim()} dimensions; use -1 for the last")
    if x.shape[dim] % 2:
        raise ValueError(
            f"{op}: x.shape[{dim}]={x.shape[dim]} must be even (the [gate | up] halves); check the projection size"
        )


def swiglu(x: torch.Tensor, dim: int = -1, *, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate, up = x.chunk(2, dim)`` (gate is the first half).

    Shapes: ``x`` [..., 2F, ...] (even size along ``dim``) -> [..., F, ...], same dtype.
    Half-precision inputs are computed in float32 and rounded once. Differentiable (once).
    """
    _check_gated_input("swiglu", x, dim)
    return call("swiglu", x, backend, x, dim)


def geglu(x: torch.Tensor, dim: int = -1, approximate: str = "none", *, backend: str | None = None) -> torch.Tensor:
    """``gelu(gate, approximate) * up`` where ``gate, up = x.chunk(2, dim)``.

    ``approximate`` is ``"none"`` (erf GELU) or ``"tanh"`` (the tanh approximation used by
    ``gelu_pytorch_tanh`` models). Shapes and precision as :func:`swiglu`. Differentiable (once).
    """
    _check_gated_input("geglu", x, dim)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"geglu: approximate={approximate!r} must be one of {', '.join(map(repr, APPROXIMATIONS))}")
    return call("geglu", x, backend, x, dim, approximate)
