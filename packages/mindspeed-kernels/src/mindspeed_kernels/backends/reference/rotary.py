"""Rotary embedding application in plain torch (an analytic backward for constant cos/sin)."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The 90-degree rotation paired with ``cos``'s layout (see ``rotary_pos_emb``)."""
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    return x * cos + _rotate(x, interleaved) * sin


class _Rotary(torch.autograd.Function):
    """``x * cos + rotate(x) * sin`` for constant ``cos``/``sin`` with a two-op backward:
    ``rotate`` is orthogonal with ``rotate^T = -rotate``, so ``dx = g * cos - rotate(g * sin)``
    (autograd would replay the chunk/neg/cat graph instead)."""

    @staticmethod
    def forward(ctx, x, cos, sin, interleaved):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return _apply(x, cos, sin, interleaved)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        grad_x = grad_out * cos - _rotate(grad_out * sin, ctx.interleaved)
        return grad_x, None, None, None


def rotary_pos_emb(x, cos, sin, interleaved=False):
    """See :func:`mindspeed_kernels.ops.rotary_pos_emb`."""
    rot = cos.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)  # half inputs are rotated in float32
    x_rot = x[..., :rot].to(dtype)
    cos, sin = cos.to(dtype), sin.to(dtype)
    if cos.requires_grad or sin.requires_grad:  # learnt frequencies: let autograd differentiate them too
        out = _apply(x_rot, cos, sin, interleaved)
    else:
        out = _Rotary.apply(x_rot, cos, sin, interleaved)
    out = out.to(x.dtype)
    if rot == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rot:]), dim=-1)
