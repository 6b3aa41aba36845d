"""rms_norm -> ``torch.nn.functional.rms_norm`` (torch's fused CUDA kernel).

``compute_in_fp32`` (default) upcasts x and the weight to float32 before the call and casts
the result back, so statistics, normalisation and scaling are all float32 whatever the fused
kernel's internal precision is; ``add_rmsnorm_offset`` forms ``1 + weight`` in the compute
dtype. ``compute_in_fp32=False`` calls it in x's dtype (the weight cast to it). Gradients come
from torch's autograd formula for ``rms_norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x, weight=None, eps=1e-6, *, add_rmsnorm_offset=False, compute_in_fp32=True):
    """See :func:`mindspeed_kernels.ops.rms_norm` and this module's docstring."""
    dtype = torch.promote_types(x.dtype, torch.float32) if compute_in_fp32 else x.dtype
    w = None if weight is None else weight.to(dtype)
    if w is not None and add_rmsnorm_offset:
        w = w + 1
    return F.rms_norm(x.to(dtype), (x.shape[-1],), w, float(eps)).to(x.dtype)
