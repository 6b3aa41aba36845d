"""grouped_matmul on CUDA: ``torch.nn.functional.grouped_mm`` (torch's grouped GEMM) when the call
fits it, else the reference implementation (one GEMM per group).

:func:`grouped_mm_fits` is the decision, from torch 2.13's documented and checked requirements:
a CUDA device of compute capability >= 8.0, bfloat16, and K and N multiples of 8 (16-byte row
strides). ``offs`` are the int32 cumulative row ends, built on the device from ``group_list``
(no host synchronisation). The kernel leaves rows past the last group unwritten, so they are
zero-filled here, in the output and in x's gradient; the weight gradient ``x_e^T dy_e`` is the
same kernel with both operands 2-d (M-jagged contraction), giving [E, K, N]. ``bias`` is added
in x's dtype per row from the row's group (the kernel's bias is not per group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_mm_fits(*, device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype, rows: int,
                    experts: int, k: int, n: int) -> bool:
    """Whether ``F.grouped_mm`` computes this call (see the module docstring)."""
    if device_type != "cuda" or capability is None or capability < (8, 0):
        return False
    return dtype == torch.bfloat16 and rows > 0 and experts > 0 and k % 8 == 0 and n % 8 == 0


def row_ends(group_list, group_list_type: int, device) -> torch.Tensor:
    """Cumulative row ends as an int32 tensor on ``device``."""
    if isinstance(group_list, torch.Tensor):
        ends = group_list.to(device) if group_list_type == 0 else group_list.to(device).cumsum(0)
        return ends.to(torch.int32)
    values = list(group_list)
    if group_list_type == 1:
        values = torch.tensor(values, dtype=torch.int64).cumsum(0).tolist()
    return torch.tensor(values, dtype=torch.int32, device=device)


class _GroupedMM(torch.autograd.Function):
    """x [M, K] @ weights [E, K, N] by groups of rows; rows past ``ends[-1]`` give 0 (and get 0)."""

    @staticmethod
    def forward(ctx, x, weights, ends, past):
        ctx.save_for_backward(x, weights, ends, past)
        return F.grouped_mm(x, weights, offs=ends).masked_fill(past, 0)

    @staticmethod
    def backward(ctx, dy):
        x, weights, ends, past = ctx.saved_tensors
        dy = dy.contiguous().masked_fill(past, 0)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = F.grouped_mm(dy, weights.transpose(-2, -1), offs=ends).masked_fill(past, 0)
        if ctx.needs_input_grad[1]:
            dw = F.grouped_mm(x.transpose(-2, -1), dy, offs=ends)
        return dx, dw, None, None


def grouped_mm_path(x, weights, group_list, group_list_type=0, bias=None):
    """The ``F.grouped_mm`` implementation (callable on CPU too, where torch also implements it)."""
    ends = row_ends(group_list, group_list_type, x.device)
    row = torch.arange(x.shape[0], dtype=torch.int32, device=x.device)
    past = (row >= ends[-1]).unsqueeze(-1)
    out = _GroupedMM.apply(x.contiguous(), weights.contiguous(), ends, past)
    if bias is not None:
        owner = torch.searchsorted(ends, row, right=True).clamp(max=weights.shape[0] - 1)
        out = (out + bias.to(x.dtype).index_select(0, owner)).masked_fill(past, 0)
    return out


def grouped_matmul(x, weights, group_list, *, group_list_type=0, bias=None):
    """See :func:`mindspeed_kernels.ops.grouped_matmul` and this module's docstring."""
    on_cuda = x.device.type == "cuda"
    fits = grouped_mm_fits(
        device_type=x.device.type, capability=torch.cuda.get_device_capability(x.device) if on_cuda else None,
        dtype=x.dtype, rows=x.shape[0], experts=weights.shape[0], k=x.shape[1], n=weights.shape[2],
    )
    if not fits:
        from mindspeed_kernels.backends import reference

        return reference.OPS["grouped_matmul"](x, weights, group_list, group_list_type=group_list_type, bias=bias)
    return grouped_mm_path(x, weights, group_list, group_list_type, bias)
