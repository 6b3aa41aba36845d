"""The progress line, the JSONL metrics file, TensorBoard scalars and the loss-curve PNG."""

from __future__ import annotations

import io
import os
import struct

import numpy as np
import pytest

from mindspeed_train.metrics import LOSS_CURVE_FILE, LOSS_CURVE_SIZE, MetricsLog, StepMetrics, read_metrics


def _step(i: int, eval_loss: float | None = None) -> StepMetrics:
    return StepMetrics(iteration=i, loss=5.0 - i, lr=1e-3, grad_norm=0.5, seconds=0.25, tokens_per_s=256.0,
                       consumed_samples=4 * i, eval_loss=eval_loss)  # fmt: skip


def test_jsonl_every_step_line_every_interval(tmp_path):
    out = io.StringIO()
    log = MetricsLog(str(tmp_path / "o"), train_iters=5, log_interval=2, enabled=True, stream=out)
    for i in range(1, 6):
        log.record(_step(i))
    rows = read_metrics(str(tmp_path / "o"))
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5] and rows[2]["loss"] == 2.0
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["2/5", "4/5", "5/5"]  # every 2nd step and the last
    for field in ("loss 3.000000", "lr 1.000e-03", "grad norm 0.5000", "tokens/s 256", "s/iter 0.250", "ETA 0:00:0"):
        assert field in lines[0]


def test_disabled_rank_writes_nothing(tmp_path):
    out = io.StringIO()
    MetricsLog(str(tmp_path / "o"), train_iters=1, log_interval=1, enabled=False, stream=out).record(_step(1))
    assert out.getvalue() == "" and not (tmp_path / "o").exists()


def test_eval_loss_in_line_and_jsonl(tmp_path):
    out = io.StringIO()
    log = MetricsLog(str(tmp_path / "o"), train_iters=2, log_interval=1, enabled=True, stream=out)
    log.record(_step(1))
    log.record(_step(2, eval_loss=3.25))
    rows = read_metrics(str(tmp_path / "o"))
    assert [r["eval_loss"] for r in rows] == [None, 3.25]
    first, second = out.getvalue().splitlines()
    assert "eval loss" not in first and second.endswith("| eval loss 3.250000")


def _png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", head[16:24])


def test_close_draws_the_loss_curve_of_the_whole_file(tmp_path):
    out = str(tmp_path / "o")
    for first, last in ((1, 3), (4, 5)):  # a run and its resumed continuation append to one file
        log = MetricsLog(out, train_iters=5, log_interval=9, enabled=True, stream=io.StringIO())
        for i in range(first, last + 1):
            log.record(_step(i, eval_loss=4.0 - i if i % 2 == 0 else None))
        log.close()
    assert _png_size(os.path.join(out, LOSS_CURVE_FILE)) == LOSS_CURVE_SIZE
    assert [r["iteration"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(str(tmp_path / "o"), train_iters=3, log_interval=1, enabled=True, stream=io.StringIO(),
                     tensorboard_dir=str(tmp_path / "tb"))  # fmt: skip
    for i in (1, 2, 3):
        log.record(_step(i, eval_loss=0.1 * i if i == 2 else None))
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 4.0), (2, 3.0), (3, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [(2, float(np.float32(0.2)))]
    assert [e.value for e in events.Scalars("train/tokens_per_s")] == [256.0] * 3
