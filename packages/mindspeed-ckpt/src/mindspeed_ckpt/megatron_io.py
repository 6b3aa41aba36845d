"""Megatron's legacy checkpoint layout.

::

    M/latest_checkpointed_iteration.txt      "1" (or "release")
    M/iter_0000001/mp_rank_TT/model_optim_rng.pt          (PP = 1)
    M/iter_0000001/mp_rank_TT_PPP/model_optim_rng.pt      (PP > 1)

Each file is ``torch.save`` of ``{"model": state_dict, "checkpoint_version": 3.0,
"iteration": N, "args": argparse.Namespace}``, the keys megatron's ``load_checkpoint`` reads.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TRACKER = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def iteration_dir(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def save_rank(root: Path, iteration: int, tp_rank: int, pp_rank: int, pp: int,
              model: dict[str, torch.Tensor], args: argparse.Namespace) -> Path:
    """Write one rank file; returns its path."""
    d = root / iteration_dir(iteration) / rank_dir(tp_rank, pp_rank, pp)
    d.mkdir(parents=True, exist_ok=True)
    path = d / FILE
    torch.save({"model": model, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, "args": args}, path)
    return path


def write_tracker(root: Path, iteration: int) -> None:
    (root / TRACKER).write_text(f"{iteration}\n", encoding="utf-8")


@dataclass(frozen=True)
class LegacyCheckpoint:
    """A located legacy checkpoint: its iteration directory and TP/PP sizes (from the rank
    directories, cross-checked with the saved args)."""

    root: Path
    step_dir: Path
    tp: int
    pp: int

    def path(self, tp_rank: int, pp_rank: int) -> Path:
        return self.step_dir / rank_dir(tp_rank, pp_rank, self.pp) / FILE

    def load(self, tp_rank: int, pp_rank: int) -> dict[str, Any]:
        """One rank file (memory-mapped: tensors are read when used)."""
        return load_file(self.path(tp_rank, pp_rank))


def load_file(path: Path) -> dict[str, Any]:
    """A rank file's dict; ValueError naming the file when missing, corrupt or malformed."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), Mapping):
        raise ValueError(f"{path}: expected a dict with a 'model' state dict (megatron legacy checkpoint)")
    return ckpt


def args_get(args: Any, key: str, default: Any = None) -> Any:
    """A field of the saved args (an argparse.Namespace or a dict)."""
    if isinstance(args, Mapping):
        return args.get(key, default)
    return getattr(args, key, default)


def locate(mcore_dir: str | Path) -> LegacyCheckpoint:
    """Find the iteration directory named by the tracker file and the TP/PP grid of rank files."""
    root = Path(mcore_dir)
    if not root.is_dir():
        raise ValueError(f"--mcore-dir {root}: not a directory")
    tracker = root / TRACKER
    if not tracker.is_file():
        raise ValueError(f"{tracker}: file not found (not a megatron legacy checkpoint directory)")
    text = tracker.read_text(encoding="utf-8").strip()
    if text != "release" and not text.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number or 'release', got {text[:40]!r}")
    step_dir = root / iteration_dir(text)
    if not step_dir.is_dir():
        raise ValueError(f"{step_dir}: iteration directory named by {TRACKER} not found")
    ranks = [m for p in step_dir.iterdir() if (m := _RANK_DIR.match(p.name))]
    if not ranks:
        raise ValueError(f"{step_dir}: no mp_rank_* directories")
    tp = 1 + max(int(m.group(1)) for m in ranks)
    pp = 1 + max(int(m.group(2) or 0) for m in ranks)
    ckpt = LegacyCheckpoint(root, step_dir, tp, pp)
    for t in range(tp):
        for p in range(pp):
            if not ckpt.path(t, p).is_file():
                raise ValueError(f"{ckpt.path(t, p)}: rank file missing (found TP={tp}, PP={pp} from the rank directories)")
    return ckpt
