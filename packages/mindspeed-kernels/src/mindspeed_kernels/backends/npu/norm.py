"""rms_norm -> ``torch_npu.npu_rms_norm(self, gamma, epsilon=1e-06) -> (y, rstd)``.

The kernel normalises over gamma's trailing dimensions; ``x`` is viewed as [-1, H] (the kernel
takes 2-8 dimensions) and gamma is:

- ``weight`` when it has x's dtype (the kernel's same-dtype pairs), else ``weight`` in float32
  (the documented float32-gamma pairs for float16/bfloat16 ``x`` on Atlas A2/A3);
- ``1 + weight`` computed in float32 for ``add_rmsnorm_offset`` (so the offset is not rounded
  to the weight's dtype);
- ones for ``weight=None``.

``compute_in_fp32=False`` is honoured only up to precision: the kernel has one precision mode,
assumed to be float32 internally (the contract's default). The result is then at least as
accurate as the x.dtype computation the flag asks for and differs from it by a few units in the
last place of x.dtype; pass ``backend="reference"`` for a bit-exact low-precision computation.
float64 inputs run the reference implementation. Gradients come from torch_npu's autograd
formula for the kernel.
"""

from __future__ import annotations

import torch

from mindspeed_kernels.backends.npu._common import KERNEL_DTYPES, reference_op


def _gamma(x: torch.Tensor, weight: torch.Tensor | None, add_rmsnorm_offset: bool) -> torch.Tensor:
    if weight is None:
        return torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    if add_rmsnorm_offset:
        return weight.float() + 1.0
    return weight if weight.dtype == x.dtype else weight.float()


def rms_norm(x, weight=None, eps=1e-6, *, add_rmsnorm_offset=False, compute_in_fp32=True):
    """See :func:`mindspeed_kernels.ops.rms_norm` and this module's docstring."""
    if x.dtype not in KERNEL_DTYPES or (weight is not None and weight.dtype not in KERNEL_DTYPES):
        return reference_op("rms_norm")(
            x, weight, eps, add_rmsnorm_offset=add_rmsnorm_offset, compute_in_fp32=compute_in_fp32
        )
    import torch_npu

    y, _ = torch_npu.npu_rms_norm(x.reshape(-1, x.shape[-1]), _gamma(x, weight, add_rmsnorm_offset), epsilon=float(eps))
    return y.reshape(x.shape)
