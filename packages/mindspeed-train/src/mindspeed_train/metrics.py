"""Progress output of a training run: one line per log interval, a JSONL metrics file, TensorBoard
scalars (when a directory is given) and a loss-curve PNG at the end.

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
LOSS_CURVE_FILE = "loss_curve.png"
LOSS_CURVE_SIZE = (800, 500)  # pixels (width, height) of the loss-curve PNG
# StepMetrics field -> TensorBoard tag (one scalar per step; eval_loss only on evaluation steps).
TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
                    "tokens_per_s": "train/tokens_per_s", "eval_loss": "eval/loss"}  # fmt: skip


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
    eval_loss: float | None = None  # token-mean validation loss when this step evaluated, else None
    memory_mb: float | None = None  # peak device memory (accelerator) or peak RSS (CPU) of this rank, MiB
    loss_scale: float | None = None  # fp16 only: the loss scale after the step
    skipped: bool = False  # fp16 only: the gradients overflowed, the update was skipped
    aux: dict | None = None  # auxiliary losses by megatron's names (load_balancing_loss, mtp_1 loss, ...)


class MetricsLog:
    """Writes ``StepMetrics`` to ``OUTPUT/metrics.jsonl`` (every step, appended, so a resumed run
    continues the file) and prints one line every ``log_interval`` steps; also TensorBoard scalars
    under ``tensorboard_dir`` (when set). ``close()`` draws ``OUTPUT/loss_curve.png``."""

    def __init__(self, output_dir: str, *, train_iters: int, log_interval: int, enabled: bool,
                 stream: TextIO | None = None, tensorboard_dir: str | None = None) -> None:
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.train_iters, self.log_interval, self.enabled = train_iters, max(log_interval, 1), enabled
        self.stream = stream or sys.stdout
        self._start = time.monotonic()
        self._first: int | None = None
        self.output_dir = output_dir
        self._writer = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            if tensorboard_dir:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=tensorboard_dir)

    def record(self, step: StepMetrics) -> None:
        if not self.enabled:
            return
        if self._first is None:
            self._first = step.iteration - 1
        with open(self.path, "a") as handle:
            handle.write(json.dumps(asdict(step)) + "\n")
        if self._writer is not None:
            for field, tag in TENSORBOARD_TAGS.items():
                value = getattr(step, field)
                if value is not None:
                    self._writer.add_scalar(tag, value, global_step=step.iteration)
            for name, value in (step.aux or {}).items():
                self._writer.add_scalar(f"train/{name.replace(' ', '_')}", value, global_step=step.iteration)
        if step.iteration % self.log_interval == 0 or step.iteration == self.train_iters:
            print(self.line(step), file=self.stream, flush=True)

    def line(self, step: StepMetrics) -> str:
        done = step.iteration - (self._first or 0)
        per_iter = (time.monotonic() - self._start) / max(done, 1)
        eta = per_iter * (self.train_iters - step.iteration)
        return (f"iteration {step.iteration:>6}/{self.train_iters} | loss {step.loss:.6f} | lr {step.lr:.3e} | "
                f"grad norm {step.grad_norm:.4f} | tokens/s {step.tokens_per_s:,.0f} | s/iter {step.seconds:.3f} | "
                f"ETA {_clock(eta)}" + _extras(step))  # fmt: skip

    def close(self) -> None:
        """Flush TensorBoard and draw the loss curve of the whole metrics file (a resumed run's too)."""
        if not self.enabled:
            return
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if os.path.isfile(self.path):
            write_loss_curve(read_metrics(self.output_dir), os.path.join(self.output_dir, LOSS_CURVE_FILE))


def _extras(step: StepMetrics) -> str:
    parts = [f"{name} {value:.4f}" for name, value in (step.aux or {}).items()]
    parts += [] if step.memory_mb is None else [f"mem {step.memory_mb:,.0f} MiB"]
    if step.loss_scale is not None:
        parts.append(f"loss scale {step.loss_scale:.0f}" + (" (skipped)" if step.skipped else ""))
    if step.eval_loss is not None:
        parts.append(f"eval loss {step.eval_loss:.6f}")
    return "".join(f" | {part}" for part in parts)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def read_metrics(output_dir: str) -> list[dict]:
    """The records of ``OUTPUT/metrics.jsonl``, in order."""
    with open(os.path.join(output_dir, METRICS_FILE)) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_loss_curve(rows: list[dict], path: str) -> None:
    """A PNG of ``LOSS_CURVE_SIZE`` pixels: training loss per iteration, eval loss as points."""
    # Figure + the Agg canvas directly: no pyplot, so no global backend or GUI is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(LOSS_CURVE_SIZE[0] / dpi, LOSS_CURVE_SIZE[1] / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot([r["iteration"] for r in rows], [r["loss"] for r in rows], label="train loss")
    evals = [r for r in rows if r.get("eval_loss") is not None]
    if evals:
        axes.plot([r["iteration"] for r in evals], [r["eval_loss"] for r in evals], "o", label="eval loss")
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.savefig(path, format="png", dpi=dpi)
