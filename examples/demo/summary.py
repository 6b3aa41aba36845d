"""Print where the demo's outputs are, the per-step times, and the first vs last loss of
pretraining and SFT (from each run's ``metrics.jsonl``). Exit 1 when the pretraining loss did
not fall clearly: the mean of the last 5 steps must be at least ``--min-drop`` nats below the
first step's loss.

    python summary.py DEMO_DIR [--min-drop 1.0]

DEMO_DIR layout (written by examples/demo.sh): ``pretrain/`` and ``sft/`` (metrics.jsonl,
loss_curve.png, ckpt/), ``tensorboard/``, ``export/`` (the Hugging Face model), ``timings.tsv``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def losses(run_dir: str) -> list[float]:
    """The training losses of ``run_dir/metrics.jsonl`` in iteration order."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["iteration"])]


def first_last(values: list[float], tail: int = 5) -> tuple[float, float]:
    """(first loss, mean of the last ``tail`` losses)."""
    end = values[-tail:]
    return values[0], sum(end) / len(end)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_dir")
    parser.add_argument("--min-drop", type=float, default=1.0, help="nats the pretraining loss must fall (default 1.0)")
    args = parser.parse_args(argv)
    d = args.demo_dir
    print(f"outputs under {d}:")
    for label, rel in (("pretraining metrics", "pretrain/metrics.jsonl"), ("pretraining loss curve", "pretrain/loss_curve.png"),
                       ("pretraining checkpoint", "pretrain/ckpt"), ("SFT metrics", "sft/metrics.jsonl"),
                       ("SFT loss curve", "sft/loss_curve.png"), ("SFT checkpoint", "sft/ckpt"),
                       ("TensorBoard logs", "tensorboard"), ("Hugging Face export", "export"), ("logs", "logs")):
        path = os.path.join(d, rel)
        print(f"  {label:24s} {path}{'' if os.path.exists(path) else '  (missing)'}")
    timings = os.path.join(d, "timings.tsv")
    if os.path.exists(timings):
        print("step times (s):")
        with open(timings, encoding="utf-8") as handle:
            rows = [line.rstrip("\n").split("\t") for line in handle if line.strip()]
        for name, secs in rows:
            print(f"  {float(secs):7.1f}  {name}")
        print(f"  {sum(float(secs) for _, secs in rows):7.1f}  total")
    status = 0
    for run in ("pretrain", "sft"):
        values = losses(os.path.join(d, run))
        first, last = first_last(values)
        tail = min(5, len(values))
        print(f"{run:8s} loss: first {first:.3f} -> last {last:.3f} (mean of the last {tail} of {len(values)} steps)")
        if run == "pretrain" and not first - last >= args.min_drop:
            print(f"demo: the pretraining loss fell by {first - last:.3f} nats, less than {args.min_drop}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
