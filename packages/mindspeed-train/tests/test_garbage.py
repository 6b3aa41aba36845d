"""mindspeed_train.garbage (megatron's manual garbage collection) in this process: which collections run
when, that the automatic collector is off inside a manual run and back (as it was) afterwards, and the
settings' validation. The loop's use of it is tested in test_loop_eval.py."""

from __future__ import annotations

import gc

import pytest
import train_helpers as th

from mindspeed_train import garbage
from mindspeed_train.config import GcSettings

MANUAL = GcSettings(manual=True, interval=3)


@pytest.fixture
def collections():
    was_enabled = gc.isenabled()
    gc.disable()  # no automatic collection may interleave with the ones under test
    with th.manual_collections() as seen:
        yield seen
    if was_enabled:
        gc.enable()


def test_manual_run_turns_the_collector_off_and_restores_it(collections):
    gc.enable()
    with garbage.manual_collection(MANUAL):
        assert not gc.isenabled()
    assert gc.isenabled() and collections == [2]
    gc.disable()
    with pytest.raises(RuntimeError), garbage.manual_collection(MANUAL):
        raise RuntimeError("a failing step")
    assert not gc.isenabled()  # it was off before: stays off


def test_interval_and_evaluation_collections(collections):
    for iteration in range(1, 8):
        garbage.after_iteration(MANUAL, iteration)
    assert collections == [2, 2]  # iterations 3 and 6
    with garbage.around_evaluation(MANUAL):
        collections.append("eval")
    assert collections == [2, 2, 2, "eval", 0]


def test_automatic_settings_collect_nothing(collections):
    automatic = GcSettings()
    with garbage.manual_collection(automatic), garbage.around_evaluation(automatic):
        garbage.after_iteration(automatic, 3)
    assert collections == []
    garbage.after_iteration(GcSettings(manual=True, interval=0), 3)
    assert collections == []


@pytest.mark.parametrize(("manual", "interval", "message"), [
    (True, -1, "--manual-gc-interval -1: must be >= 0"),
    (False, 2, "--manual-gc-interval 2 is used only with --manual-gc"),
])  # fmt: skip
def test_settings_are_validated(manual, interval, message):
    with pytest.raises(ValueError, match=message):
        GcSettings(manual=manual, interval=interval)
