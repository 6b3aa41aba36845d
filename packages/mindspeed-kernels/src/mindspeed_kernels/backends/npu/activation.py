"""swiglu -> ``torch_npu.npu_swiglu(input, dim=-1)``; geglu -> ``torch_npu.npu_geglu(input, dim=-1,
approximate=1, activate_left=False) -> (out, gelu)``.

Both kernels split ``x`` in two halves along ``dim``. npu_swiglu computes ``silu(A) * B`` with A
the first half, which is our gate. npu_geglu activates the right half by default;
``activate_left=True`` (documented for aclnnGeGluV3 as "true: activate the left half",
``out = gelu(A) * B``) makes the first half the gate, and ``approximate`` is 0 for the erf GELU
and 1 for the tanh one (the kernel's default is 1, so it is always passed explicitly).

npu_swiglu needs a contiguous input of 1-8 dimensions. The kernels' internal precision for
half inputs is not documented; it is assumed to be float32, as the contract states. float64
inputs (and swiglu inputs of more than 8 dimensions) run the reference implementation.
Gradients come from torch_npu's autograd formulas for the kernels.
"""

from __future__ import annotations

from mindspeed_kernels.backends.npu._common import KERNEL_DTYPES, reference_op

_APPROXIMATE = {"none": 0, "tanh": 1}


def swiglu(x, dim=-1):
    """See :func:`mindspeed_kernels.ops.swiglu` and this module's docstring."""
    if x.dtype not in KERNEL_DTYPES or x.dim() > 8:
        return reference_op("swiglu")(x, dim)
    import torch_npu

    return torch_npu.npu_swiglu(x.contiguous(), dim=dim)


def geglu(x, dim=-1, approximate="none"):
    """See :func:`mindspeed_kernels.ops.geglu` and this module's docstring."""
    if x.dtype not in KERNEL_DTYPES:
        return reference_op("geglu")(x, dim, approximate)
    import torch_npu

    out, _ = torch_npu.npu_geglu(x, dim=dim, approximate=_APPROXIMATE[approximate], activate_left=True)
    return out
