"""Cross-entropy of a linear layer's output without materialising the full logits."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mindspeed_kernels.ops._dispatch import call

REDUCTIONS = ("mean", "sum", "none")


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    reduction: str = "mean",
    chunk_size: int = 4096,
    process_group: dist.ProcessGroup | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, labels)`` computed ``chunk_size`` tokens at a time.

    ``hidden`` [..., Hd]; ``weight`` [V, Hd] (with ``process_group``: this rank's contiguous
    vocabulary shard [V / world, Hd], rank r holding ids ``[r * V/world, (r+1) * V/world)``, as
    Megatron's vocab-parallel output layer; ``hidden`` is replicated across the group and its
    gradient is all-reduced inside the op); ``labels`` [...] int64 global ids, ``ignore_index``
    positions contribute 0 loss and 0 gradient. Logits are computed in float32 one chunk at a
    time; peak extra memory is O(chunk_size * V), never O(tokens * V).

    ``reduction``: ``"mean"`` over non-ignored tokens (NaN when all are ignored, like
    ``F.cross_entropy``), ``"sum"`` (Megatron's ``calculate_per_token_loss``: divide by the
    global token count yourself), or ``"none"``: the per-token loss [...] (0 at ignored
    positions) for RL and custom reductions. Returns float32 (float64 for float64 inputs).
    Differentiable in ``hidden`` and ``weight`` (first order).

    ``hidden`` and ``weight`` must share a floating dtype and a device; ``labels`` may be any
    integer dtype; a label outside ``[0, V)`` (V the full vocabulary) that is not
    ``ignore_index`` raises ``ValueError``. With ``process_group`` every rank holds an equal
    shard and the same ``hidden``, ``labels`` and upstream gradient; ``mean`` divides by this
    call's non-ignored token count. With ``reduction`` ``"mean"``/``"sum"`` and a gradient
    required, backends may compute the gradients during the forward call (the reference backend
    does: forward + backward then costs the three matmuls of the unfused formula).
    """
    _validate(hidden, weight, labels, ignore_index, reduction, chunk_size, process_group)
    return call(
        "fused_linear_cross_entropy",
        hidden,
        backend,
        hidden,
        weight,
        labels,
        ignore_index,
        reduction=reduction,
        chunk_size=chunk_size,
        process_group=process_group,
    )


def _validate(hidden, weight, labels, ignore_index, reduction, chunk_size, process_group) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a floating dtype, got {hidden.dtype} and {weight.dtype}; cast one")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must be [V, Hd] with V >= 1, got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden's last dim must equal weight's last dim (Hd), got hidden {tuple(hidden.shape)} "
            f"and weight {tuple(weight.shape)}; pass weight as [V, Hd]"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape must be hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64 class ids), got {labels.dtype}; use labels.long()")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(
            f"hidden, weight and labels must be on one device, got {hidden.device}, {weight.device}, {labels.device}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; choose one of {', '.join(REDUCTIONS)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1 (tokens per chunk), got {chunk_size!r}")
    if process_group is not None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "process_group was given but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first or pass process_group=None"
        )
