"""Discovering subcommands without importing them.

A package registers ``[project.entry-points."mindspeed.commands"] NAME = "module:main"`` where
``main(argv: list[str]) -> int``. KNOWN lists the commands of this monorepo so that ``--help``
can say which package to install for a missing one; unknown plugins are listed too.
"""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Callable
from dataclasses import dataclass

GROUP = "mindspeed.commands"

# command -> (distribution that provides it, one-line purpose)
KNOWN: dict[str, tuple[str, str]] = {
    "args": ("mindspeed-args", "validate, show, list and translate launch parameters"),
    "env": ("mindspeed-cli", "device, collective backend and library versions"),
    "convert": ("mindspeed-ckpt", "convert checkpoints between Hugging Face and Megatron"),
    "preprocess": ("mindspeed-train", "tokenise raw data into Megatron indexed datasets"),
    "train": ("mindspeed-train", "pretrain or fine-tune a model (torchrun-compatible)"),
    "rl": ("mindspeed-rl", "preference and RL training (DPO, GRPO, ...)"),
}


@dataclass(frozen=True)
class Command:
    name: str
    dist: str | None
    entry: md.EntryPoint

    def load(self) -> Callable[[list[str]], int]:
        return self.entry.load()


def installed() -> dict[str, Command]:
    """Registered commands by name (the entry points are not loaded)."""
    out = {}
    for ep in md.entry_points(group=GROUP):
        dist = ep.dist.metadata["Name"] if getattr(ep, "dist", None) else None
        out.setdefault(ep.name, Command(ep.name, dist, ep))
    return out


def mindspeed_distributions() -> dict[str, str]:
    """Every installed distribution named mindspeed or mindspeed-*, with its version."""
    out = {}
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name == "mindspeed" or name.startswith("mindspeed-"):
            out[name] = dist.version
    return dict(sorted(out.items()))
