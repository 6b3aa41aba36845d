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


def _half_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float, swap_sin: bool) -> torch.Tensor:
    """``[x1 c1 - sign x2 s1 | x2 c2 + sign x1 s2]`` over the two halves of the last dim (``swap_sin``:
    sin's halves exchanged, as views), written half by half into one new tensor (no negated copy, no
    cat, no copy of the table)."""
    half = cos.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c1, c2 = cos[..., :half], cos[..., half:]
    s1, s2 = (sin[..., half:], sin[..., :half]) if swap_sin else (sin[..., :half], sin[..., half:])
    # cos/sin broadcast to ``x`` without enlarging it (checked by ops.rotary_pos_emb)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x1, c1, out=o1).addcmul_(x2, s1, value=-sign)
    torch.mul(x2, c2, out=o2).addcmul_(x1, s2, value=sign)
    return out


class _Rotary(torch.autograd.Function):
    """``x * cos + rotate(x) * sin`` for constant ``cos``/``sin`` with a two-op backward:
    ``rotate`` is orthogonal with ``rotate^T = -rotate``, so ``dx = g * cos - rotate(g * sin)``
    (autograd would replay the chunk/neg/cat graph instead). Rotate-half computes both directions
    half by half: ``out = [x1 c1 - x2 s1 | x2 c2 + x1 s2]``, ``dx = [g1 c1 + g2 s2 | g2 c2 - g1 s1]``
    (any tables, not only ``cat(freqs, freqs)``)."""

    @staticmethod
    def forward(ctx, x, cos, sin, interleaved):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        if interleaved:
            return _apply(x, cos, sin, interleaved)
        return _half_rotate(x, cos, sin, sign=1.0, swap_sin=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        if ctx.interleaved:
            return grad_out * cos - _rotate(grad_out * sin, True), None, None, None
        # dx1 = g1 c1 + g2 s2 and dx2 = g2 c2 - g1 s1: the forward's pattern with sin's halves swapped
        return _half_rotate(grad_out, cos, sin, sign=-1.0, swap_sin=True), None, None, None


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
