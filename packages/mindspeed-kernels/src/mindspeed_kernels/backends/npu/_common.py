"""Helpers shared by the npu backend's modules."""

from __future__ import annotations

import torch

# dtypes torch_npu's fused kernels accept; anything else (float64) runs the reference op
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def reference_op(name: str):
    """The reference implementation of op ``name`` (imported late: the reference package is big)."""
    from mindspeed_kernels.backends import reference

    return reference.OPS[name]
