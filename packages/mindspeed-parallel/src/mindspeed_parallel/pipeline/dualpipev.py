"""DualPipeV executor: a model cut into 2*PP chunks laid out in a V over PP ranks.

Rank r holds chunks r and 2*PP-1-r, so the first and the last chunk live on rank 0 (which takes
the micro-batch inputs and the labels). The op list each rank runs is
``simulator.build_dualpipev`` — the same list the simulator measures. Activations and gradients
move by tagged point-to-point messages over the caller's process group (``p2p``); the hand-off
between chunks PP-1 and PP on the last rank stays local.

Weight gradients: the warm-up B/W/F triples always split the backward (input gradients first,
dW in the W slot right after). ``dw_detach=True`` (MindSpeed ``--dualpipev-dw-detach``) also
splits the cooldown backwards, filling the tail bubble with W passes at the cost of holding
their activations longer. Only ``WeightGradLinear`` layers defer (see ``weight_grad``).

Forward/backward overlap seam: when the schedule runs the forward of one chunk and the backward
of the other in one slot (an "F&B" op), the executor calls
``overlapped_forward_backward(forward, backward)``. The default runs ``forward.run()`` then
``backward.run()``. Subclass and override it to interleave the two (e.g. MoE fb-overlap: run
the forward's attention while the backward's all-to-all is in flight). The override must call
each ``run`` exactly once (or reproduce its effect) and return the forward's result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mindspeed_parallel.pipeline import p2p
from mindspeed_parallel.pipeline.simulator import Op, Schedule, Task, build_dualpipev
from mindspeed_parallel.pipeline.weight_grad import WeightGradStore, bind_weight_grad_store

LossFn = Callable[[torch.Tensor, object], torch.Tensor]


@dataclass
class ForwardWork:
    """Forward of one chunk for one micro-batch. ``run()`` returns the chunk output, or for the
    last chunk the micro-batch loss already divided by the micro-batch count."""

    module: nn.Module
    inputs: torch.Tensor
    stage: int
    microbatch: int
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None

    def run(self) -> torch.Tensor:
        out = self.module(self.inputs)
        return out if self.loss is None else self.loss(out)


@dataclass
class BackwardWork:
    """Full backward of one chunk for one micro-batch: ``outputs`` is what its forward returned,
    ``grad`` the gradient w.r.t. it (None for a scalar loss). ``run()`` accumulates ``.grad``."""

    module: nn.Module
    outputs: torch.Tensor
    grad: torch.Tensor | None
    stage: int
    microbatch: int

    def run(self) -> None:
        torch.autograd.backward(self.outputs, self.grad)


class PipelineRunner:
    """Runs one rank's ops of a ``Schedule`` (shared by DualPipeV and DualPipe executors).

    ``modules[(stream, stage)]`` are this rank's chunks; ``group`` the pipeline process group
    whose group ranks are the schedule's ranks.
    """

    def __init__(self, modules: dict[tuple[int, int], nn.Module], group: dist.ProcessGroup | None, owner) -> None:
        self.modules, self.group, self.owner = modules, group, owner
        self.store = WeightGradStore()
        for module in modules.values():
            bind_weight_grad_store(module, self.store)

    def run(self, schedule: Schedule, inputs: dict, labels: dict, loss_fn: LossFn | None) -> torch.Tensor | None:
        """Execute ``schedule.rank_ops[rank]``; returns the sum of this rank's scaled losses or None."""
        self.schedule, self.rank = schedule, dist.get_rank(self.group)
        self.inputs, self.labels, self.loss_fn = inputs, labels, loss_fn
        self.saved: dict[tuple, tuple] = {}
        self.local_grads: dict[tuple, torch.Tensor] = {}
        self.sends: list[dist.Work] = []
        self.losses: list[torch.Tensor] = []
        try:
            for op in schedule.rank_ops[self.rank]:
                self._run_op(op)
            if len(self.store):
                raise RuntimeError(f"{schedule.name}: {len(self.store)} deferred weight-gradient groups left (schedule bug)")
        finally:
            p2p.wait_all(self.sends)
            self.saved, self.local_grads = {}, {}
        return torch.stack(self.losses).sum() if self.losses else None

    def _run_op(self, op: Op) -> None:
        if op.kind == "W":
            self.store.pop()
        elif op.kind == "F":
            self._finish_forward(op.tasks[0], self._forward_work(op.tasks[0]).run())
        elif op.kind in ("B", "b"):
            task = op.tasks[0]
            work = self._backward_work(task)
            with self.store.capture() if task.input_only else nullcontext():
                work.run()
            self._finish_backward(task)
        else:
            fwd_task, bwd_task = op.tasks
            forward, backward = self._forward_work(fwd_task), self._backward_work(bwd_task)
            out = self.owner.overlapped_forward_backward(forward, backward)
            self._finish_forward(fwd_task, out)
            self._finish_backward(bwd_task)

    def _tag(self, kind: int, task: Task, stage: int) -> int:
        s = self.schedule
        return ((kind * len(s.stage_rank) + task.stream) * s.num_stages + stage) * s.num_microbatches + task.microbatch

    def _forward_work(self, task: Task) -> ForwardWork:
        key, prev = (task.stream, task.stage, task.microbatch), task.stage - 1
        if task.stage == 0:
            x = self.inputs[task.stream][task.microbatch]
        elif self.schedule.stage_rank[task.stream][prev] == self.rank:
            x = self.saved[(task.stream, prev, task.microbatch)][1].detach().requires_grad_()
        else:
            src = self.schedule.stage_rank[task.stream][prev]
            x = p2p.recv_tensor(src, self._tag(0, task, prev), self.group).requires_grad_()
        loss = None
        if task.stage == self.schedule.num_stages - 1:
            label, scale = self.labels[task.stream][task.microbatch], 1.0 / self.schedule.num_microbatches
            loss = lambda out: self.loss_fn(out, label) * scale  # noqa: E731 - closes over this micro-batch's label
        self.saved[key] = (x, None)
        return ForwardWork(self.modules[(task.stream, task.stage)], x, task.stage, task.microbatch, loss)

    def _finish_forward(self, task: Task, out: torch.Tensor) -> None:
        key, nxt = (task.stream, task.stage, task.microbatch), task.stage + 1
        self.saved[key] = (self.saved[key][0], out)
        if nxt == self.schedule.num_stages:
            self.losses.append(out.detach())
        elif self.schedule.stage_rank[task.stream][nxt] != self.rank:
            self.sends += p2p.isend_tensor(
                out, self.schedule.stage_rank[task.stream][nxt], self._tag(0, task, task.stage), self.group
            )

    def _backward_work(self, task: Task) -> BackwardWork:
        key, nxt = (task.stream, task.stage, task.microbatch), task.stage + 1
        x, out = self.saved[key]
        if nxt == self.schedule.num_stages:
            grad = None
        elif self.schedule.stage_rank[task.stream][nxt] == self.rank:
            grad = self.local_grads.pop((task.stream, nxt, task.microbatch))
        else:
            grad = p2p.recv_tensor(self.schedule.stage_rank[task.stream][nxt], self._tag(1, task, nxt), self.group)
        return BackwardWork(self.modules[(task.stream, task.stage)], out, grad, task.stage, task.microbatch)

    def _finish_backward(self, task: Task) -> None:
        key, prev = (task.stream, task.stage, task.microbatch), task.stage - 1
        x, _ = self.saved.pop(key)
        if task.stage == 0:
            return
        if x.grad is None:
            raise RuntimeError(f"stage {task.stage} micro-batch {task.microbatch}: the chunk output does not depend on its input")
        if self.schedule.stage_rank[task.stream][prev] == self.rank:
            self.local_grads[key] = x.grad
        else:
            self.sends += p2p.isend_tensor(
                x.grad, self.schedule.stage_rank[task.stream][prev], self._tag(1, task, task.stage), self.group
            )


class DualPipeV:
    """DualPipeV over the ranks of ``group`` (size PP; None = default group).

    ``chunks``: this rank's two chunks ``(chunk r, chunk 2*PP-1-r)``; each maps a tensor to a
    tensor (``[micro-batch, ...]`` activations; chunk outputs feed the next chunk unchanged).
    """

    def __init__(self, chunks: Sequence[nn.Module], group: dist.ProcessGroup | None = None, dw_detach: bool = False) -> None:
        if len(chunks) != 2 or not all(isinstance(c, nn.Module) for c in chunks):
            raise TypeError(f"DualPipeV: chunks must be two nn.Modules (chunk r, chunk 2*PP-1-r); got {chunks!r:.80}")
        self.group, self.dw_detach = group, bool(dw_detach)
        self.num_ranks, self.rank = dist.get_world_size(group), dist.get_rank(group)
        pp = self.num_ranks
        self.runner = PipelineRunner({(0, self.rank): chunks[0], (0, 2 * pp - 1 - self.rank): chunks[1]}, group, self)

    def overlapped_forward_backward(self, forward: ForwardWork, backward: BackwardWork) -> torch.Tensor:
        """Run one chunk's forward and the other chunk's backward of an F&B slot; returns the
        forward's result. Default: one after the other. Override to overlap them."""
        out = forward.run()
        backward.run()
        return out

    def step(self, num_microbatches: int, inputs: Sequence[torch.Tensor] | None = None,
             labels: Sequence[object] | None = None, loss_fn: LossFn | None = None) -> torch.Tensor | None:  # fmt: skip
        """One forward+backward over ``num_microbatches`` (>= 2*PP) micro-batches.

        On rank 0 pass ``inputs`` (list of micro-batch tensors), ``labels`` (one per micro-batch)
        and ``loss_fn(output, label) -> scalar``; other ranks pass only ``num_microbatches``.
        Each micro-batch loss is divided by ``num_microbatches`` before its backward, so parameter
        ``.grad`` accumulates the gradient of the mean loss. Returns that mean loss (detached) on
        rank 0, None elsewhere.
        """
        schedule = build_dualpipev(self.num_ranks, num_microbatches, self.dw_detach)
        if self.rank == 0:
            _check_feed("inputs", inputs, num_microbatches)
            _check_feed("labels", labels, num_microbatches)
            if not callable(loss_fn):
                raise TypeError("DualPipeV.step: loss_fn must be callable on rank 0 (loss_fn(output, label) -> scalar)")
        return self.runner.run(schedule, {0: inputs}, {0: labels}, loss_fn)


def _check_feed(name: str, items: Sequence | None, count: int) -> None:
    if items is None or len(items) != count:
        got = "None" if items is None else f"{len(items)} items"
        raise ValueError(f"{name} must hold one entry per micro-batch ({count}) on the rank that owns it; got {got}")
