"""``--profile``: torch.profiler over a window of training iterations, one Chrome trace per rank.

Which iterations (megatron's convention, from its ``training.py``): megatron's loop counter
``iteration`` is the number of iterations already done; it starts the profiler at the top of the
loop when that counter equals ``--profile-step-start`` and stops it after the step that makes it
``--profile-step-end``. So the profiled iterations are those with 0-based index ``i`` in
``[step_start, step_end)``: the 1-based iterations ``step_start + 1 .. step_end`` that the logs print
(defaults 10, 12: iterations 11 and 12; ``step_start`` 0: from the first iteration). ``step_end`` -1
profiles to the end of the run. A run resumed inside the window profiles the rest of the window.

How much (``--profile-level``), on top of the activities (the accelerator's kernels when there is
one, CPU operators when ``--profile-with-cpu`` is set or there is no accelerator):

==========  =================================================================================
level_none  nothing is recorded (no trace)
level0      operator and kernel events; ``--profile-record-shapes``, ``--profile-with-memory``
            and ``--profile-with-stack`` add shapes, allocations and Python stacks
level1      level0 + input shapes and FLOP estimates of matmul/conv operators, whatever the flags say
level2      level1 + allocations and Python stacks, whatever the flags say
==========  =================================================================================

Output: ``SAVE_PATH/rank{R}.iter{A}-{B}.pt.trace.json`` (A..B the 1-based iterations profiled), a
Chrome trace (chrome://tracing, Perfetto) that TensorBoard's profiler plugin also reads
(``tensorboard --logdir SAVE_PATH``).
"""

from __future__ import annotations

import os

import torch

from mindspeed_train.config import ProfileSettings

LEVELS = ("level_none", "level0", "level1", "level2")
# torch.profiler's activity for each accelerator kind of mindspeed_kernels.accelerator
# (Ascend NPUs report through the PrivateUse1 backend of torch_npu).
DEVICE_ACTIVITY = {"cuda": "CUDA", "npu": "PrivateUse1"}


def _check(settings: ProfileSettings) -> None:
    if settings.level not in LEVELS:
        raise ValueError(f"--profile-level {settings.level!r} is unknown; use one of {', '.join(LEVELS)}")
    if settings.step_start < 0:
        raise ValueError(f"--profile-step-start {settings.step_start} is negative; pass 0 or more")
    if settings.step_end != -1 and settings.step_end <= settings.step_start:
        raise ValueError(f"--profile-step-end {settings.step_end} must be greater than --profile-step-start "
                         f"{settings.step_start} (or -1: to the end of the run)")  # fmt: skip


def _activities(with_cpu: bool) -> list:
    from mindspeed_kernels import accelerator

    name = DEVICE_ACTIVITY.get(accelerator.device_type())
    device = getattr(torch.profiler.ProfilerActivity, name, None) if name else None
    activities = [device] if device is not None else []
    if with_cpu or not activities:
        activities.append(torch.profiler.ProfilerActivity.CPU)
    return activities


class TrainProfiler:
    """Profiles this rank over the iteration window of ``settings`` (see the module docstring).

    Call :meth:`step` after every training iteration with its 1-based number and :meth:`close` when
    the run ends; ``start_iteration`` is the number of iterations done before the loop (a resume).
    Disabled, ``level_none`` or a rank not in ``settings.ranks``: every call does nothing.
    """

    def __init__(self, settings: ProfileSettings, rank: int, *, start_iteration: int = 0):
        _check(settings)
        self.settings, self.rank = settings, rank
        self.enabled = (settings.enabled and settings.level != "level_none"
                        and (-1 in settings.ranks or rank in settings.ranks))  # fmt: skip
        self.traces: list[str] = []  # the files written so far
        self._profiler: torch.profiler.profile | None = None
        self._first = 0  # 1-based number of the first iteration of the running window
        self._done = start_iteration  # iterations done so far
        self._update(start_iteration)

    def _inside(self, done: int) -> bool:
        """Is the next iteration (0-based index ``done``) in the window?"""
        end = self.settings.step_end
        return self.settings.step_start <= done and (end == -1 or done < end)

    def _update(self, done: int) -> None:
        self._done = done
        if not self.enabled:
            return
        if self._inside(done) and self._profiler is None:
            self._start(done + 1)
        elif not self._inside(done) and self._profiler is not None:
            self._stop(done)

    def _start(self, first: int) -> None:
        s = self.settings
        depth = LEVELS.index(s.level)  # 1: level0 ... 3: level2
        self._profiler = torch.profiler.profile(
            activities=_activities(s.with_cpu), record_shapes=s.record_shapes or depth >= 2, with_flops=depth >= 2,
            profile_memory=s.with_memory or depth >= 3, with_stack=s.with_stack or depth >= 3,
        )  # fmt: skip
        self._profiler.start()
        self._first = first

    def _stop(self, last: int) -> None:
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        if last < self._first:  # the window opened after the run's last iteration: nothing ran in it
            return
        os.makedirs(self.settings.save_path, exist_ok=True)
        path = os.path.join(self.settings.save_path, f"rank{self.rank}.iter{self._first}-{last}.pt.trace.json")
        profiler.export_chrome_trace(path)
        self.traces.append(path)

    def step(self, iteration: int) -> None:
        """Iteration ``iteration`` (1-based) has finished: start or stop the profiler as the window says."""
        self._update(iteration)

    def close(self) -> None:
        """End of the run: write the trace of a window still open (``step_end`` -1, or a run that
        ended inside the window)."""
        if self._profiler is not None:
            self._stop(self._done)
