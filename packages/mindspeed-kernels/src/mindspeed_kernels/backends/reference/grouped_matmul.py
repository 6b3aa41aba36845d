"""Grouped matmul in plain torch: one GEMM per group (E is small)."""

from __future__ import annotations

import torch


def _row_ends(group_list, group_list_type: int) -> list[int]:
    values = group_list.tolist() if isinstance(group_list, torch.Tensor) else list(group_list)
    if group_list_type == 1:
        ends, total = [], 0
        for count in values:
            total += count
            ends.append(total)
        return ends
    return values


def grouped_matmul(x, weights, group_list, *, group_list_type=0, bias=None):
    """See :func:`mindspeed_kernels.ops.grouped_matmul`."""
    pieces, start = [], 0
    for expert, end in enumerate(_row_ends(group_list, group_list_type)):
        rows = x[start:end]
        if bias is None:
            pieces.append(rows @ weights[expert])
        else:
            pieces.append(torch.addmm(bias[expert].to(x.dtype), rows, weights[expert]))
        start = end
    # rows past the last group's end have no expert: zeros, with no gradient path
    pieces.append(x.new_zeros(x.shape[0] - start, weights.shape[2]))
    return torch.cat(pieces, dim=0)
