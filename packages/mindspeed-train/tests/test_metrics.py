"""The progress line and the JSONL metrics file."""

from __future__ import annotations

import io

from mindspeed_train.metrics import MetricsLog, StepMetrics, read_metrics


def _step(i: int) -> StepMetrics:
    return StepMetrics(iteration=i, loss=5.0 - i, lr=1e-3, grad_norm=0.5, seconds=0.25, tokens_per_s=256.0,
                       consumed_samples=4 * i)  # fmt: skip


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
