"""SwiGLU / GEGLU in plain torch; backward recomputes from the saved input (no activations kept)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def _halves(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(x.dtype, torch.float32)  # half inputs are computed in float32
    gate, up = x.chunk(2, dim)
    return gate.to(dtype), up.to(dtype)


def _act(gate: torch.Tensor, kind: str) -> torch.Tensor:
    return F.silu(gate) if kind == "silu" else F.gelu(gate, approximate=kind)


def _act_backward(grad: torch.Tensor, gate: torch.Tensor, kind: str) -> torch.Tensor:
    """``grad * d act(gate) / d gate`` with torch's own fused backward kernels (one pass)."""
    if kind == "silu":
        return torch.ops.aten.silu_backward(grad, gate)
    return torch.ops.aten.gelu_backward(grad, gate, approximate=kind)


class _Gated(torch.autograd.Function):
    """``act(gate) * up``; ``kind`` is "silu", or GELU's approximate "none"/"tanh"."""

    @staticmethod
    def forward(ctx, x, dim, kind):
        gate, up = _halves(x, dim)
        ctx.save_for_backward(x)
        ctx.dim, ctx.kind = dim, kind
        return (_act(gate, kind) * up).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        gate, up = _halves(x, ctx.dim)
        g = grad_out.to(gate.dtype)
        grad_x = torch.empty(x.shape, dtype=gate.dtype, device=x.device)
        grad_gate, grad_up = grad_x.chunk(2, ctx.dim)
        grad_gate.copy_(_act_backward(g * up, gate, ctx.kind))
        torch.mul(g, _act(gate, ctx.kind), out=grad_up)
        return grad_x.to(x.dtype), None, None


def swiglu(x, dim=-1):
    """See :func:`mindspeed_kernels.ops.swiglu`."""
    return _Gated.apply(x, dim, "silu")


def geglu(x, dim=-1, approximate="none"):
    """See :func:`mindspeed_kernels.ops.geglu`."""
    return _Gated.apply(x, dim, approximate)
