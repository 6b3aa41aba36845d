"""Reference fused linear cross-entropy: ``cross_entropy(hidden @ weight.T, labels)`` chunk by chunk.

Only ``chunk_size`` rows of logits exist at a time (float32, or float64 for float64 inputs);
half-precision weights are upcast once per call, so a float32 copy of the (shard of the) weight
lives for the call, and the weight gradient is accumulated in float32.

- ``mean``/``sum`` with a gradient needed: the gradients are computed during the forward sweep
  (``softmax - onehot`` of each chunk, then ``d_hidden = g @ W`` and ``d_weight += g^T @ h``), so
  forward + backward costs the three matmuls of the unfused formula and no logits are recomputed;
  backward only scales the stored gradients by the scalar upstream gradient.
- ``none``: the upstream gradient differs per token, so forward keeps the per-token log-sum-exp
  and backward recomputes each logits chunk.
- Vocab parallel (``process_group``): ``weight`` is this rank's contiguous shard. Per chunk, one
  all-gather exchanges each rank's (row max, sum of exp relative to that max, target logit);
  every rank combines them into the global log-sum-exp. The hidden gradient chunk is all-reduced
  in float32 because ``hidden`` is replicated across the group.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable


@dataclass
class _Problem:
    """The flattened, validated inputs of one call and this rank's view of the vocabulary."""

    hidden: torch.Tensor  # [N, Hd], the caller's dtype
    weight: torch.Tensor  # [Vl, Hd] in the compute dtype
    local: torch.Tensor  # [N] int64 label index inside this shard (0 where the label is elsewhere)
    in_shard: torch.Tensor  # [N] bool: the label is a vocabulary id held by this rank
    valid: torch.Tensor  # [N] bool: label != ignore_index
    group: dist.ProcessGroup | None
    chunk_size: int

    def chunks(self) -> Iterator[tuple[int, int]]:
        rows = self.hidden.shape[0]
        for start in range(0, rows, self.chunk_size):
            yield start, min(start + self.chunk_size, rows)

    def hidden_chunk(self, start: int, end: int) -> torch.Tensor:
        return self.hidden[start:end].to(self.weight.dtype)


def _problem(hidden, weight, labels, ignore_index, chunk_size, group) -> _Problem:
    compute = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    vocab_local = weight.shape[0]
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    labels = labels.reshape(-1).long()
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab_local * world))
    if bool(bad.any()):
        raise ValueError(
            f"labels must be vocabulary ids in [0, {vocab_local * world}) or ignore_index={ignore_index}; "
            f"got {int(labels[bad][0])}: fix the labels or pass the matching ignore_index"
        )
    local = labels - rank * vocab_local
    in_shard = valid & (local >= 0) & (local < vocab_local)
    return _Problem(
        hidden=hidden.reshape(-1, hidden.shape[-1]),
        weight=weight.to(compute),
        local=torch.where(in_shard, local, torch.zeros_like(local)),
        in_shard=in_shard,
        valid=valid,
        group=group,
        chunk_size=chunk_size,
    )


def _gather_stats(stats: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[3, c] per rank -> [world, 3, c]: one collective per chunk instead of a MAX and a SUM all-reduce."""
    out = stats.new_empty((dist.get_world_size(group), *stats.shape))
    dist.all_gather(list(out.unbind(0)), stats.contiguous(), group=group)
    return out


def _chunk_forward(p: _Problem, h: torch.Tensor, start: int, end: int):
    """Logits of rows ``start:end`` -> ``(exp(logits - m), m, lse, target_logit)``.

    ``m`` is this rank's row max; ``lse`` and ``target_logit`` are global over the vocabulary.
    """
    logits = h @ p.weight.T
    in_shard = p.in_shard[start:end]
    target = logits.gather(1, p.local[start:end, None]).squeeze(1)
    target = torch.where(in_shard, target, torch.zeros_like(target))
    row_max = logits.amax(dim=1)
    exp = logits.sub_(row_max[:, None]).exp_()
    sum_exp = exp.sum(dim=1)
    if p.group is None:
        return exp, row_max, row_max + sum_exp.log(), target
    stats = _gather_stats(torch.stack([row_max, sum_exp, target]), p.group)
    global_max = stats[:, 0].amax(dim=0)
    total = (stats[:, 1] * (stats[:, 0] - global_max).exp()).sum(dim=0)
    return exp, row_max, global_max + total.log(), stats[:, 2].sum(dim=0)


def _logit_grad_(exp: torch.Tensor, row_scale: torch.Tensor, p: _Problem, start: int, end: int, row_weight: torch.Tensor):
    """Turn ``exp`` in place into ``row_weight * (softmax - onehot(label))`` for this shard's columns.

    ``row_scale`` maps ``exp`` to ``row_weight * softmax`` (it folds the 1/sum-of-exp in).
    """
    exp.mul_(row_scale[:, None])
    onehot = torch.where(p.in_shard[start:end], row_weight, torch.zeros_like(row_weight))
    return exp.scatter_add_(1, p.local[start:end, None], -onehot[:, None])


@dataclass
class _Results:
    """What the sweeps fill in, row range by row range (None where not wanted)."""

    loss: torch.Tensor | None = None  # [N] compute dtype
    lse: torch.Tensor | None = None  # [N] compute dtype, global log-sum-exp of each row
    d_hidden: torch.Tensor | None = None  # [N, Hd] hidden's dtype
    d_weight: torch.Tensor | None = None  # [Vl, Hd] compute dtype


def _accumulate(p: _Problem, g: torch.Tensor, h: torch.Tensor, start: int, end: int, out: _Results) -> None:
    """Add one chunk's contribution ``g`` [c, Vl] to the hidden and weight gradients."""
    if out.d_hidden is not None:
        part = g @ p.weight
        if p.group is not None:
            dist.all_reduce(part, group=p.group)
        out.d_hidden[start:end].copy_(part)
    if out.d_weight is not None:
        out.d_weight.addmm_(g.T, h)


# One function per chunk so that its [c, Vl] buffer is freed before the next chunk's is allocated.
def _forward_chunk(p: _Problem, out: _Results, row_weight: torch.Tensor | None, start: int, end: int) -> None:
    h = p.hidden_chunk(start, end)
    exp, row_max, lse, target = _chunk_forward(p, h, start, end)
    out.loss[start:end] = torch.where(p.valid[start:end], lse - target, torch.zeros_like(lse))
    out.lse[start:end] = lse
    if row_weight is not None:
        weight_c = row_weight[start:end]
        g = _logit_grad_(exp, weight_c * (row_max - lse).exp(), p, start, end, weight_c)
        _accumulate(p, g, h, start, end, out)


def _backward_chunk(p: _Problem, out: _Results, row_weight: torch.Tensor, start: int, end: int) -> None:
    h = p.hidden_chunk(start, end)
    probs = (h @ p.weight.T).sub_(out.lse[start:end, None]).exp_()
    weight_c = row_weight[start:end]
    _accumulate(p, _logit_grad_(probs, weight_c, p, start, end, weight_c), h, start, end, out)


def _grad_buffers(p: _Problem, need_hidden: bool, need_weight: bool) -> _Results:
    return _Results(
        d_hidden=torch.empty_like(p.hidden) if need_hidden else None,
        d_weight=torch.zeros_like(p.weight) if need_weight else None,
    )


def _forward_sweep(p: _Problem, row_weight: torch.Tensor | None, need_hidden=False, need_weight=False) -> _Results:
    """Per-token loss and log-sum-exp; with ``row_weight`` [N] also the gradients of
    ``sum(row_weight * loss)``."""
    out = _grad_buffers(p, need_hidden, need_weight) if row_weight is not None else _Results()
    out.loss = torch.empty(p.hidden.shape[0], dtype=p.weight.dtype, device=p.hidden.device)
    out.lse = torch.empty_like(out.loss)
    for start, end in p.chunks():
        _forward_chunk(p, out, row_weight, start, end)
    return out


def _backward_sweep(p: _Problem, lse: torch.Tensor, row_weight: torch.Tensor, need_hidden: bool, need_weight: bool):
    """Gradients of ``sum(row_weight * loss)``, recomputing each logits chunk from the saved ``lse``."""
    out = _grad_buffers(p, need_hidden, need_weight)
    out.lse = lse
    for start, end in p.chunks():
        _backward_chunk(p, out, row_weight, start, end)
    return out


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    total = loss.sum()
    return total / valid.sum() if reduction == "mean" else total


def _as_inputs(out: _Results, hidden: torch.Tensor, weight: torch.Tensor):
    """The gradients shaped and typed like ``hidden`` and ``weight`` (weight's: cast from the compute dtype)."""
    d_hidden = out.d_hidden.view_as(hidden) if out.d_hidden is not None else None
    d_weight = out.d_weight.to(weight.dtype) if out.d_weight is not None else None
    return d_hidden, d_weight


class _StoredGrads(torch.autograd.Function):
    """``mean``/``sum``: gradients computed in forward; backward scales them by the scalar grad."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size, group):
        p = _problem(hidden, weight, labels, ignore_index, chunk_size, group)
        row_weight = p.valid.to(p.weight.dtype)
        if reduction == "mean":
            # clamp: all tokens ignored gives a NaN loss but zero gradients, as F.cross_entropy
            row_weight = row_weight / p.valid.sum().clamp(min=1)
        out = _forward_sweep(p, row_weight, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(*_as_inputs(out, hidden, weight))
        return _reduce(out.loss, p.valid, reduction)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        d_hidden, d_weight = ctx.saved_tensors
        # The usual upstream gradient is exactly 1: hand over the stored gradients, which autograd
        # then takes as .grad without a copy, instead of allocating a scaled weight-sized tensor.
        if not bool(grad_loss == 1):
            # a 0-dim float32 factor keeps a half-precision gradient's dtype and multiplies in float32
            d_hidden = d_hidden * grad_loss if d_hidden is not None else None
            d_weight = d_weight * grad_loss if d_weight is not None else None
        return d_hidden, d_weight, None, None, None, None, None


class _Recomputed(torch.autograd.Function):
    """``none``: forward keeps the per-token log-sum-exp; backward recomputes the logits chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, group):
        p = _problem(hidden, weight, labels, ignore_index, chunk_size, group)
        out = _forward_sweep(p, None)
        ctx.save_for_backward(hidden, weight, labels, out.lse)
        ctx.args = (ignore_index, chunk_size, group)
        return out.loss.view(labels.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse = ctx.saved_tensors
        p = _problem(hidden, weight, labels, *ctx.args)
        row_weight = torch.where(p.valid, grad_loss.reshape(-1).to(p.weight.dtype), torch.zeros_like(lse))
        out = _backward_sweep(p, lse, row_weight, *ctx.needs_input_grad[:2])
        return (*_as_inputs(out, hidden, weight), None, None, None, None)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    reduction: str = "mean",
    chunk_size: int = 4096,
    process_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """See :func:`mindspeed_kernels.ops.fused_linear_cross_entropy` (arguments already validated)."""
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        p = _problem(hidden, weight, labels, ignore_index, chunk_size, process_group)
        loss = _forward_sweep(p, None).loss
        return loss.view(labels.shape) if reduction == "none" else _reduce(loss, p.valid, reduction)
    if reduction == "none":
        return _Recomputed.apply(hidden, weight, labels, ignore_index, chunk_size, process_group)
    return _StoredGrads.apply(hidden, weight, labels, ignore_index, reduction, chunk_size, process_group)
