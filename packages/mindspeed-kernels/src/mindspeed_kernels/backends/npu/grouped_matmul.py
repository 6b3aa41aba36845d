"""grouped_matmul -> ``torch_npu.npu_grouped_matmul(x, weight, *, bias=None, ..., group_list=None,
split_item=0, group_type=None, group_list_type=0, ...) -> List[Tensor]``.

Forward: ``npu_grouped_matmul([x], [weights], group_list=g, split_item=3, group_type=0,
group_list_type=t)[0]`` (one x, one [E, K, N] weight, one output, groups along M). torch_npu
registers no autograd formula for this kernel, so backward is written here with the same
kernel: ``dx`` = M-grouped ``dy @ weights[e]^T`` (a transposed weight view, documented as
supported) and ``dw[e] = x_e^T @ dy_e`` with ``group_type=2`` (K-grouped: x passed as the
transposed view ``x.t()``, output [E, K, N]).

The kernel requires the groups to cover x exactly, while the contract allows rows past the
last group (outputs 0): those rows are cut before the kernel and zero-filled after it (the
group end is read on the host; the op's validation has synchronised already). ``bias`` is
added here in x's dtype, row by row from each row's group (the kernel's bias dtype rules
differ per input dtype). float64 inputs, and calls whose groups cover no row, run the
reference implementation.
"""

from __future__ import annotations

import torch

from mindspeed_kernels.backends.npu._common import KERNEL_DTYPES, reference_op


def _counts(group_list, group_list_type: int) -> list[int]:
    values = group_list.tolist() if isinstance(group_list, torch.Tensor) else list(group_list)
    if group_list_type == 1:
        return values
    return [end - start for start, end in zip([0, *values[:-1]], values, strict=True)]


def _gmm(x: torch.Tensor, weight: torch.Tensor, groups: torch.Tensor, group_list_type: int, group_type: int):
    import torch_npu

    return torch_npu.npu_grouped_matmul(
        [x], [weight], group_list=groups, split_item=3, group_type=group_type, group_list_type=group_list_type
    )[0]


class _GroupedMatmul(torch.autograd.Function):
    """x [rows, K] (exactly covered by the groups) @ weights [E, K, N], both gradients by the kernel."""

    @staticmethod
    def forward(ctx, x, weights, groups, group_list_type):
        ctx.save_for_backward(x, weights, groups)
        ctx.group_list_type = group_list_type
        return _gmm(x, weights, groups, group_list_type, group_type=0)

    @staticmethod
    def backward(ctx, dy):
        x, weights, groups = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _gmm(dy, weights.transpose(1, 2), groups, ctx.group_list_type, group_type=0)
        if ctx.needs_input_grad[1]:
            dw = _gmm(x.t(), dy, groups, ctx.group_list_type, group_type=2)
        return dx, dw, None, None


def grouped_matmul(x, weights, group_list, *, group_list_type=0, bias=None):
    """See :func:`mindspeed_kernels.ops.grouped_matmul` and this module's docstring."""
    counts = _counts(group_list, group_list_type)
    total = sum(counts)
    if x.dtype not in KERNEL_DTYPES or total == 0:
        return reference_op("grouped_matmul")(x, weights, group_list, group_list_type=group_list_type, bias=bias)
    if isinstance(group_list, torch.Tensor):
        groups = group_list.to(device=x.device, dtype=torch.int64)
    else:
        groups = torch.tensor(group_list, dtype=torch.int64, device=x.device)
    out = _GroupedMatmul.apply(x[:total].contiguous(), weights.contiguous(), groups, group_list_type)
    if bias is not None:
        expert = torch.arange(len(counts), device=x.device)
        owner = torch.repeat_interleave(expert, torch.tensor(counts, device=x.device), output_size=total)
        out = out + bias.to(x.dtype).index_select(0, owner)
    if total < x.shape[0]:
        out = torch.cat((out, out.new_zeros(x.shape[0] - total, out.shape[1])), dim=0)
    return out
