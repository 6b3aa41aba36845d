"""DualPipe executor (DeepSeek-V3): two copies of a PP-stage model fed from both pipeline ends.

Stream 0 runs stages 0..PP-1 on ranks 0..PP-1; stream 1 runs the same stages on ranks PP-1..0,
so rank r holds stage r of copy 0 and stage PP-1-r of copy 1 (2x parameters per rank). Each
stream gets half of the micro-batches; their forward and backward passes meet in the middle and
overlap in F&B slots exactly as in ``dualpipev`` (the same ``overlapped_forward_backward`` seam,
the same ``PipelineRunner``, op lists from ``simulator.build_dualpipe``).

Gradients: the two copies of stage k (on ranks k and PP-1-k) each hold the gradient of their own
half of the batch; their sum is the gradient of the whole batch. Summing them (and keeping the
copies' weights equal) is the caller's job, e.g. an all-reduce over a group of the rank pairs
{k, PP-1-k} — this module keeps no groups of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from mindspeed_parallel.pipeline.dualpipev import BackwardWork, ForwardWork, LossFn, PipelineRunner, _check_feed
from mindspeed_parallel.pipeline.simulator import build_dualpipe


class DualPipe:
    """DualPipe over the ranks of ``group`` (even size PP; None = default group).

    ``stages``: this rank's ``(stage r of copy 0, stage PP-1-r of copy 1)``, tensor -> tensor.
    ``dw_detach``: defer cooldown weight gradients (DeepSeek's reference always does; default True).
    """

    def __init__(self, stages: Sequence[nn.Module], group: dist.ProcessGroup | None = None, dw_detach: bool = True) -> None:
        if len(stages) != 2 or not all(isinstance(m, nn.Module) for m in stages):
            raise TypeError(
                f"DualPipe: stages must be two nn.Modules (stage r of copy 0, stage PP-1-r of copy 1); got {stages!r:.80}"
            )
        self.group, self.dw_detach = group, bool(dw_detach)
        self.num_ranks, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if self.num_ranks % 2:
            raise ValueError(f"DualPipe needs an even pipeline group size; got {self.num_ranks} (use DualPipeV for odd sizes)")
        pp = self.num_ranks
        self.runner = PipelineRunner({(0, self.rank): stages[0], (1, pp - 1 - self.rank): stages[1]}, group, self)

    def overlapped_forward_backward(self, forward: ForwardWork, backward: BackwardWork) -> torch.Tensor:
        """Same seam as ``DualPipeV.overlapped_forward_backward``; default runs them in sequence."""
        out = forward.run()
        backward.run()
        return out

    def step(self, num_microbatches: int, inputs: Sequence[torch.Tensor] | None = None,
             labels: Sequence[object] | None = None, loss_fn: LossFn | None = None) -> torch.Tensor | None:  # fmt: skip
        """One forward+backward over ``num_microbatches`` (even, >= 2*PP) micro-batches.

        Rank 0 feeds stream 0 and rank PP-1 feeds stream 1: each passes ``inputs`` = its
        ``num_microbatches/2`` micro-batches, ``labels`` = the labels of the *other* end's
        micro-batches (the stream that finishes on it) and ``loss_fn(output, label) -> scalar``.
        Each loss is divided by ``num_microbatches``; the returned value (ranks 0 and PP-1, else
        None) is the sum over the stream finishing there, so rank 0's + rank PP-1's = mean loss.
        """
        schedule = build_dualpipe(self.num_ranks, num_microbatches, self.dw_detach)
        half, last = num_microbatches // 2, self.num_ranks - 1
        feeds, finishes = {}, {}
        if self.rank in (0, last):
            _check_feed("inputs", inputs, half)
            _check_feed("labels", labels, half)
            if not callable(loss_fn):
                raise TypeError("DualPipe.step: loss_fn must be callable on ranks 0 and PP-1 (loss_fn(output, label) -> scalar)")
            feeds[0 if self.rank == 0 else 1] = inputs
            finishes[1 if self.rank == 0 else 0] = labels
        return self.runner.run(schedule, feeds, finishes, loss_fn)
