"""rotary_pos_emb -> ``torch_npu.npu_rotary_mul(input, r1, r2, rotary_mode='half', rotate=None)``.

The kernel computes ``x * r1 + rotate(x) * r2`` over the whole last dimension, with
``rotary_mode`` ``'half'`` (rotate-half) or ``'interleave'`` (pairs), on 4-d tensors whose
r1/r2 broadcast in documented patterns only (x as BNSD/BSND/SBND):

- ``half``: r1 shaped 11SD, B1SD, BNSD, 1S1D, BS1D, BSND, S11D, SB1D or SBND;
- ``interleave``: 11SD, 1S1D or S11D.

So the backend rotates only the slice ``x[..., :R]`` (R = cos.shape[-1]) and concatenates the
pass-through channels, and :func:`plan_4d` reshapes x's leading dimensions into one of those
patterns by merging neighbouring dimensions that cos either matches (full) or broadcasts over.
When no pattern fits, cos/sin are expanded to x's leading shape (memory the size of the
rotated slice).

Precision: cos/sin are cast to x's dtype (the kernel takes one dtype for the three inputs),
i.e. rounded to half precision for half inputs; the contract's float32 product is then assumed
to happen inside the kernel. The extra error is at most about one unit in the last place of
x's dtype. float64 inputs run the reference implementation. Gradients (x, and cos/sin when they
require grad) come from torch_npu's autograd formula for the kernel.
"""

from __future__ import annotations

import math

import torch

from mindspeed_kernels.backends.npu._common import KERNEL_DTYPES, reference_op

FULL, BCAST = "full", "bcast"


def _groups(x_lead: tuple[int, ...], cos_lead: tuple[int, ...]) -> list[tuple[str, int]]:
    """x's leading dims merged into runs that cos matches (FULL) or broadcasts over (BCAST);
    dims of size 1 in x belong to neither and are dropped."""
    cos_lead = (1,) * (len(x_lead) - len(cos_lead)) + tuple(cos_lead)
    runs: list[tuple[str, int]] = []
    for xs, cs in zip(x_lead, cos_lead, strict=True):
        if xs == 1:
            continue
        kind = FULL if cs == xs else BCAST
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1] * xs)
        else:
            runs.append((kind, xs))
    return runs


def plan_4d(x_lead: tuple[int, ...], cos_lead: tuple[int, ...], interleaved: bool) -> tuple[tuple, tuple] | None:
    """Leading (3) dims of the 4-d x and r1 views the kernel accepts, or None when cos must be
    expanded to ``x_lead`` first. ``cos_lead`` must broadcast to ``x_lead`` (validated by the op)."""
    runs = _groups(x_lead, cos_lead)
    kinds = tuple(kind for kind, _ in runs)
    s = [size for _, size in runs]
    if kinds == ():
        return (1, 1, 1), (1, 1, 1)
    if kinds == (FULL,):  # x [1, 1, S, D], r 11SD
        return (1, 1, s[0]), (1, 1, s[0])
    if kinds == (BCAST,):  # x [B, 1, 1, D], r 11SD with S = 1
        return (s[0], 1, 1), (1, 1, 1)
    if kinds == (FULL, BCAST):  # x SBND, r S11D
        return (s[0], s[1], 1), (s[0], 1, 1)
    if kinds == (BCAST, FULL):  # x BNSD with B = 1, r 11SD
        return (1, s[0], s[1]), (1, 1, s[1])
    if kinds == (BCAST, FULL, BCAST):  # x BSND, r 1S1D
        return (s[0], s[1], s[2]), (1, s[1], 1)
    if kinds == (FULL, BCAST, FULL) and not interleaved:  # x BNSD, r B1SD (half mode only)
        return (s[0], s[1], s[2]), (s[0], 1, s[2])
    return None


def rotary_pos_emb(x, cos, sin, interleaved=False):
    """See :func:`mindspeed_kernels.ops.rotary_pos_emb` and this module's docstring."""
    if x.dtype not in KERNEL_DTYPES:
        return reference_op("rotary_pos_emb")(x, cos, sin, interleaved)
    import torch_npu

    rot = cos.shape[-1]
    x_rot = x[..., :rot]
    lead = tuple(x.shape[:-1])
    plan = plan_4d(lead, tuple(cos.shape[:-1]), interleaved)
    if plan is None:
        cos, sin = cos.expand(*lead, rot), sin.expand(*lead, rot)
        plan = (1, 1, math.prod(lead)), (1, 1, math.prod(lead))
    x_shape, r_shape = plan
    r1 = cos.to(x.dtype).reshape(*r_shape, rot)
    r2 = sin.to(x.dtype).reshape(*r_shape, rot)
    mode = "interleave" if interleaved else "half"
    out = torch_npu.npu_rotary_mul(x_rot.reshape(*x_shape, rot), r1, r2, rotary_mode=mode).reshape(x_rot.shape)
    return out if rot == x.shape[-1] else torch.cat((out, x[..., rot:]), dim=-1)
