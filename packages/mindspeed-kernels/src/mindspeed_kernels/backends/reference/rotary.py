"""Rotary embedding application in plain torch (autograd through elementwise ops)."""

from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """The 90-degree rotation paired with ``cos``'s layout (see ``rotary_pos_emb``)."""
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary_pos_emb(x, cos, sin, interleaved=False):
    """See :func:`mindspeed_kernels.ops.rotary_pos_emb`."""
    rot = cos.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)  # half inputs are rotated in float32
    x_rot = x[..., :rot].to(dtype)
    out = x_rot * cos.to(dtype) + _rotate(x_rot, interleaved) * sin.to(dtype)
    out = out.to(x.dtype)
    if rot == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rot:]), dim=-1)
