"""Experts' GEMMs in one call (torch_npu ``npu_grouped_matmul``)."""

from __future__ import annotations

import torch

from mindspeed_kernels.ops._dispatch import call


def _group_values(group_list: torch.Tensor | list[int]) -> list[int]:
    """``group_list`` as Python ints (a device tensor is copied to the host: one synchronisation)."""
    if isinstance(group_list, torch.Tensor):
        if group_list.dim() != 1 or group_list.is_floating_point() or group_list.is_complex() or group_list.dtype == torch.bool:
            raise TypeError(
                f"grouped_matmul: group_list must be a 1-D integer tensor or a list of ints, "
                f"got a {group_list.dtype} tensor of shape {tuple(group_list.shape)}"
            )
        return group_list.tolist()
    if not isinstance(group_list, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in group_list):
        raise TypeError(f"grouped_matmul: group_list must be a 1-D integer tensor or a list of ints, got {group_list!r}")
    return list(group_list)


def _check_groups(values: list[int], group_list_type: int, num_experts: int, rows: int) -> None:
    if len(values) != num_experts:
        raise ValueError(f"grouped_matmul: group_list has {len(values)} entries but weights has {num_experts} experts (E)")
    if any(v < 0 for v in values):
        raise ValueError(f"grouped_matmul: group_list={values} has a negative entry; row ends/counts must be >= 0")
    if group_list_type == 0:
        if any(b < a for a, b in zip(values[:-1], values[1:], strict=True)):
            raise ValueError(
                f"grouped_matmul: group_list={values} must be non-decreasing with group_list_type=0 (cumulative ends); "
                f"pass group_list_type=1 for per-group counts"
            )
        total = values[-1] if values else 0
    else:
        total = sum(values)
    if total > rows:
        raise ValueError(f"grouped_matmul: group_list={values} covers {total} rows but x has only {rows} (M)")


def grouped_matmul(
    x: torch.Tensor,
    weights: torch.Tensor,
    group_list: torch.Tensor | list[int],
    *,
    group_list_type: int = 0,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``out[rows of group e] = x[rows of group e] @ weights[e] (+ bias[e])``.

    ``x`` [M, K] with rows sorted by group (e.g. :func:`moe_token_permute`'s output);
    ``weights`` [E, K, N] in ``x``'s dtype; ``group_list`` [E] integers (a tensor or a list):
    cumulative row ends when ``group_list_type=0`` (torch_npu's default; non-decreasing), per-group
    row counts when ``1`` (non-negative); either way the groups cover at most M rows. Rows past the
    last group's end are outputs of 0. ``bias`` [E, N] or None, added in ``x``'s dtype.
    Validating ``group_list`` reads its values on the host (a device tensor synchronises).
    Returns [M, N] in ``x``'s dtype. Differentiable in ``x``, ``weights`` and ``bias``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"grouped_matmul: x must be a floating-point [M, K] tensor, got {got}")
    if not isinstance(weights, torch.Tensor) or weights.dim() != 3 or weights.shape[1] != x.shape[1]:
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise ValueError(f"grouped_matmul: weights must be [E, K={x.shape[1]}, N] to match x [M, K], got {got}")
    if weights.dtype != x.dtype or weights.device != x.device:
        raise TypeError(
            f"grouped_matmul: weights ({weights.dtype}, {weights.device}) must have x's dtype and device ({x.dtype}, {x.device})"
        )
    num_experts, _, out_features = weights.shape
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (num_experts, out_features):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"grouped_matmul: bias must be [E, N] = ({num_experts}, {out_features}) or None, got {got}")
        if not bias.is_floating_point() or bias.device != x.device:
            raise TypeError(
                f"grouped_matmul: bias must be a floating-point tensor on {x.device}, got {bias.dtype} on {bias.device}"
            )
    if group_list_type not in (0, 1) or isinstance(group_list_type, bool):
        raise ValueError(f"grouped_matmul: group_list_type={group_list_type!r} must be 0 (cumulative ends) or 1 (counts)")
    _check_groups(_group_values(group_list), group_list_type, num_experts, x.shape[0])
    return call("grouped_matmul", x, backend, x, weights, group_list, group_list_type=group_list_type, bias=bias)
