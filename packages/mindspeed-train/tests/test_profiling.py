"""TrainProfiler around a few tiny torch ops: which iterations and ranks get a trace, and what it holds.

Each fake iteration runs a matmul under a ``record_function`` label naming the iteration, so a
Chrome trace shows exactly which iterations the profiler saw (read back with ``json``)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

from mindspeed_train.config import ProfileSettings
from mindspeed_train.profiling import TrainProfiler


def _settings(tmp_path, **changes) -> ProfileSettings:
    return replace(ProfileSettings(enabled=True, step_start=1, step_end=3, save_path=str(tmp_path / "prof")), **changes)


def _run(profiler: TrainProfiler, iterations: range) -> None:
    """Iterations ``iterations`` (1-based), each a labelled matmul, then close()."""
    a = torch.randn(8, 8)
    for iteration in iterations:
        with torch.profiler.record_function(f"train_iteration_{iteration}"):
            torch.mm(a, a)
        profiler.step(iteration)
    profiler.close()


def _names(path: str) -> set[str]:
    with open(path) as handle:
        return {event.get("name") for event in json.load(handle)["traceEvents"]}


def _labels(path: str) -> list[int]:
    return sorted(int(n.rsplit("_", 1)[1]) for n in _names(path) if n and n.startswith("train_iteration_"))


def test_profiles_iterations_after_step_start_through_step_end(tmp_path):
    # megatron: step_start 1, step_end 3 = 0-based iterations 1 and 2 = the 1-based iterations 2 and 3
    profiler = TrainProfiler(_settings(tmp_path), rank=0)
    _run(profiler, range(1, 6))
    (trace,) = profiler.traces
    assert os.path.basename(trace) == "rank0.iter2-3.pt.trace.json"
    assert sorted(os.listdir(tmp_path / "prof")) == ["rank0.iter2-3.pt.trace.json"]
    assert _labels(trace) == [2, 3]
    assert "aten::mm" in _names(trace)


def test_step_start_zero_and_open_end(tmp_path):
    profiler = TrainProfiler(_settings(tmp_path, step_start=0, step_end=-1), rank=3)
    _run(profiler, range(1, 4))
    (trace,) = profiler.traces
    assert os.path.basename(trace) == "rank3.iter1-3.pt.trace.json" and _labels(trace) == [1, 2, 3]


def test_resume_inside_the_window_profiles_the_rest(tmp_path):
    profiler = TrainProfiler(_settings(tmp_path, step_start=1, step_end=4), rank=0, start_iteration=2)
    _run(profiler, range(3, 6))
    (trace,) = profiler.traces
    assert _labels(trace) == [3, 4]


@pytest.mark.parametrize(("ranks", "rank", "traced"), [((-1,), 5, True), ((0, 2), 2, True), ((0, 2), 1, False)])
def test_ranks_filter(tmp_path, ranks, rank, traced):
    profiler = TrainProfiler(_settings(tmp_path, ranks=ranks), rank=rank)
    _run(profiler, range(1, 5))
    assert bool(profiler.traces) == traced
    assert os.path.isdir(tmp_path / "prof") == traced


@pytest.mark.parametrize("changes", [{"enabled": False}, {"level": "level_none"}, {"step_start": 9, "step_end": 12}])
def test_nothing_is_written(tmp_path, changes):
    profiler = TrainProfiler(_settings(tmp_path, **changes), rank=0)
    _run(profiler, range(1, 5))
    assert profiler.traces == [] and not os.path.exists(tmp_path / "prof")


def test_window_opening_after_the_last_iteration_writes_nothing(tmp_path):
    profiler = TrainProfiler(_settings(tmp_path, step_start=4, step_end=6), rank=0)
    _run(profiler, range(1, 5))  # the window opens after iteration 4, the run ends there
    assert profiler.traces == []


def _has_shapes(path: str) -> bool:
    with open(path) as handle:
        events = json.load(handle)["traceEvents"]
    return any(e.get("name") == "aten::mm" and "Input Dims" in e.get("args", {}) for e in events)


def test_levels_and_flags_choose_what_is_recorded(tmp_path):
    seen = {}
    for level, flags in (("level0", {}), ("level0", {"record_shapes": True}), ("level1", {}), ("level2", {})):
        settings = _settings(tmp_path, level=level, save_path=str(tmp_path / f"{level}{len(flags)}"), **flags)
        profiler = TrainProfiler(settings, rank=0)
        _run(profiler, range(1, 4))
        seen[(level, bool(flags))] = (_has_shapes(profiler.traces[0]), "[memory]" in _names(profiler.traces[0]))
    assert seen == {("level0", False): (False, False), ("level0", True): (True, False), ("level1", False): (True, False),
                    ("level2", False): (True, True)}  # fmt: skip


@pytest.mark.parametrize(("changes", "flag"), [({"level": "level9"}, "--profile-level"),
                                                ({"step_start": 5, "step_end": 5}, "--profile-step-end"),
                                                ({"step_start": -2}, "--profile-step-start")])  # fmt: skip
def test_bad_settings_name_the_flag(tmp_path, changes, flag):
    with pytest.raises(ValueError, match=flag):
        TrainProfiler(_settings(tmp_path, **changes), rank=0)
