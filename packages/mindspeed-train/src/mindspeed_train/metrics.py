"""Progress output of a training run: one line per log interval and a JSONL metrics file.

Only the reporting rank (global rank 0, which holds the DP/TP-reduced loss) writes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import TextIO

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step. ``loss``: token-mean LM loss over the global batch; ``lr`` after the
    step's schedule update was applied to it; ``seconds``: wall time of the step; ``tokens_per_s``:
    global-batch tokens / seconds."""

    iteration: int
    loss: float
    lr: float
    grad_norm: float
    seconds: float
    tokens_per_s: float
    consumed_samples: int


class MetricsLog:
    """Writes ``StepMetrics`` to ``OUTPUT/metrics.jsonl`` (every step, appended, so a resumed run
    continues the file) and prints one line every ``log_interval`` steps."""

    def __init__(self, output_dir: str, *, train_iters: int, log_interval: int, enabled: bool,
                 stream: TextIO | None = None) -> None:
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.train_iters, self.log_interval, self.enabled = train_iters, max(log_interval, 1), enabled
        self.stream = stream or sys.stdout
        self._start = time.monotonic()
        self._first: int | None = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)

    def record(self, step: StepMetrics) -> None:
        if not self.enabled:
            return
        if self._first is None:
            self._first = step.iteration - 1
        with open(self.path, "a") as handle:
            handle.write(json.dumps(asdict(step)) + "\n")
        if step.iteration % self.log_interval == 0 or step.iteration == self.train_iters:
            print(self.line(step), file=self.stream, flush=True)

    def line(self, step: StepMetrics) -> str:
        done = step.iteration - (self._first or 0)
        per_iter = (time.monotonic() - self._start) / max(done, 1)
        eta = per_iter * (self.train_iters - step.iteration)
        return (f"iteration {step.iteration:>6}/{self.train_iters} | loss {step.loss:.6f} | lr {step.lr:.3e} | "
                f"grad norm {step.grad_norm:.4f} | tokens/s {step.tokens_per_s:,.0f} | s/iter {step.seconds:.3f} | "
                f"ETA {_clock(eta)}")  # fmt: skip


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def read_metrics(output_dir: str) -> list[dict]:
    """The records of ``OUTPUT/metrics.jsonl``, in order."""
    with open(os.path.join(output_dir, METRICS_FILE)) as handle:
        return [json.loads(line) for line in handle if line.strip()]
