"""megatron's manual garbage collection (``--manual-gc``, ``--manual-gc-interval``).

Python's automatic collector runs whenever allocations cross its thresholds: at a different moment
on each rank, so one rank's pause holds up the next collective of all the others. With
``manual_gc`` the automatic collector is off for the run and collections happen where every rank is
at the same point, as in megatron's training loop: once at the start, every ``interval`` iterations
(0: never between steps), and around each evaluation (all generations before it, generation 0, what
the evaluation left, after it). The collector's previous state comes back when the run ends.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

from mindspeed_train.config import GcSettings


@contextlib.contextmanager
def manual_collection(settings: GcSettings) -> Iterator[None]:
    """The training run's scope: automatic collection off (and one full collection) when manual."""
    if not settings.manual:
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    gc.collect()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def after_iteration(settings: GcSettings, iteration: int) -> None:
    """A full collection after every ``interval``-th iteration (1-based) when manual."""
    if settings.manual and settings.interval and iteration % settings.interval == 0:
        gc.collect()


@contextlib.contextmanager
def around_evaluation(settings: GcSettings) -> Iterator[None]:
    """One evaluation: a full collection before it and a generation-0 one after it when manual."""
    if settings.manual:
        gc.collect()
    yield
    if settings.manual:
        gc.collect(generation=0)
