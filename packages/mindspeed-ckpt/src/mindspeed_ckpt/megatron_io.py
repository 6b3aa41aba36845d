"""Megatron's legacy checkpoint layout.

::

    M/latest_checkpointed_iteration.txt      "1" (or "release")
    M/iter_0000001/mp_rank_TT/model_optim_rng.pt          (PP = 1)
    M/iter_0000001/mp_rank_TT_PPP/model_optim_rng.pt      (PP > 1)
    M/iter_0000001/mp_rank_TT[_PPP]_EEE/model_optim_rng.pt (EP > 1: EP rank appended)

Each file is (in ``torch.save``'s format, written tensor by tensor by :class:`RankWriter`)
``{"model": state_dict, "checkpoint_version": 3.0,
"iteration": N, "args": argparse.Namespace}``, the keys megatron's ``load_checkpoint`` reads;
with virtual pipeline stages (VPP) it holds ``model0``, ``model1``, ... (one per model chunk)
instead of ``model``. ``mp_rank_TT_NNN`` is a PP rank or, when PP = 1 and EP > 1, an EP rank:
the saved args (``expert_model_parallel_size``, ``pipeline_model_parallel_size``) decide.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: locate() serves the torch-free fast path
    import torch

from mindspeed_ckpt.plan import (  # noqa: F401 (re-exported: the names predate plan.py)
    CHECKPOINT_VERSION,
    FILE,
    TRACKER,
    iteration_dir,
    model_keys,
    rank_dir,
    write_tracker,
)

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


class RankWriter:
    """Streams one rank file: :meth:`add` writes a tensor's bytes at once (the caller may free
    it), :meth:`close` writes the ``{"model"..., "checkpoint_version", "iteration", "args"}``
    pickle, so memory never holds the whole state dict (see :mod:`mindspeed_ckpt.torch_zip`).
    ``vpp`` > 1 gives the keys ``model0..model{vpp-1}``; ``add`` takes the chunk index."""

    def __init__(self, root: Path, iteration: int | str, tp_rank: int, pp_rank: int, pp: int, *,
                 ep_rank: int = 0, ep: int = 1, vpp: int = 1):
        d = root / iteration_dir(iteration) / rank_dir(tp_rank, pp_rank, pp, ep_rank, ep)
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / FILE
        self.iteration = iteration
        from mindspeed_ckpt.torch_zip import TorchZipWriter

        self._zip = TorchZipWriter(self.path)
        self._models: list[dict[str, Any]] = [{} for _ in range(vpp)]

    def add(self, chunk: int, name: str, tensor: torch.Tensor) -> None:
        """Write tensor ``name`` of model chunk ``chunk`` (0 without VPP)."""
        if name in self._models[chunk]:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        self._models[chunk][name] = self._zip.add(tensor)

    def close(self, args: argparse.Namespace) -> Path:
        """Finish the file with the saved ``args``; returns its path."""
        ckpt: dict[str, Any] = dict(zip(model_keys(len(self._models)), self._models, strict=True))
        ckpt.update(checkpoint_version=CHECKPOINT_VERSION, iteration=self.iteration, args=args)
        self._zip.close(ckpt)
        return self.path


def save_rank(root: Path, iteration: int, tp_rank: int, pp_rank: int, pp: int,
              model: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]], args: argparse.Namespace, *,
              ep_rank: int = 0, ep: int = 1) -> Path:
    """Write one rank file (``model`` a state dict, or one per VPP chunk); returns its path."""
    chunks_ = model if isinstance(model, list) else [model]
    w = RankWriter(root, iteration, tp_rank, pp_rank, pp, ep_rank=ep_rank, ep=ep, vpp=len(chunks_))
    for c, sd in enumerate(chunks_):
        for name, t in sd.items():
            w.add(c, name, t)
    return w.close(args)


@dataclass(frozen=True)
class LegacyCheckpoint:
    """A located legacy checkpoint: its iteration directory and TP/PP/EP sizes (from the rank
    directories, the EP/PP ambiguity of ``mp_rank_TT_NNN`` settled by the saved args)."""

    root: Path
    step_dir: Path
    tp: int
    pp: int
    ep: int = 1

    def path(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> Path:
        return self.step_dir / rank_dir(tp_rank, pp_rank, self.pp, ep_rank, self.ep) / FILE

    def load(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> dict[str, Any]:
        """One rank file (memory-mapped: tensors are read when used)."""
        return load_file(self.path(tp_rank, pp_rank, ep_rank))


def load_file(path: Path) -> dict[str, Any]:
    """A rank file's dict; ValueError naming the file when missing, corrupt or malformed."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model", ckpt.get("model0")), Mapping):
        raise ValueError(f"{path}: expected a dict with a 'model' (or VPP 'model0', ...) state dict (megatron legacy checkpoint)")
    return ckpt


def chunks(ckpt: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The model state dicts of a loaded rank file: ``[model]`` or ``[model0, model1, ...]``."""
    if "model" in ckpt:
        return [ckpt["model"]]
    out = []
    while isinstance(ckpt.get(f"model{len(out)}"), Mapping):
        out.append(ckpt[f"model{len(out)}"])
    return out


def args_get(args: Any, key: str, default: Any = None) -> Any:
    """A field of the saved args (an argparse.Namespace or a dict)."""
    if isinstance(args, Mapping):
        return args.get(key, default)
    return getattr(args, key, default)


def locate(mcore_dir: str | Path, read_args: Callable[[Path], Any] | None = None) -> LegacyCheckpoint:
    """Find the iteration directory named by the tracker file and the TP/PP grid of rank files.
    ``read_args(rank file)``: its saved args (default: via ``torch.load``), consulted only for
    ``mp_rank_TT_NNN`` names, where they tell an EP rank from a PP rank."""
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
    ranks = [tuple(int(g) for g in m.groups() if g is not None) for p in step_dir.iterdir() if (m := _RANK_DIR.match(p.name))]
    if not ranks:
        raise ValueError(f"{step_dir}: no mp_rank_* directories")
    tp = 1 + max(r[0] for r in ranks)
    second = 1 + max((r[1] for r in ranks if len(r) > 1), default=-1)
    third = 1 + max((r[2] for r in ranks if len(r) > 2), default=-1)
    pp, ep = (second, third) if third else (second or 1, 1)
    if second and not third and _second_is_ep(step_dir, read_args or (lambda f: load_file(f).get("args"))):
        pp, ep = 1, second
    ckpt = LegacyCheckpoint(root, step_dir, tp, pp, ep)
    for t in range(tp):
        for p in range(pp):
            for e in range(ep):
                if not ckpt.path(t, p, e).is_file():
                    raise ValueError(f"{ckpt.path(t, p, e)}: rank file missing (found TP={tp}, PP={pp}, EP={ep} from the "
                                     "rank directories)")
    return ckpt


def _second_is_ep(step_dir: Path, read_args: Callable[[Path], Any]) -> bool:
    """Is ``NNN`` of ``mp_rank_00_NNN`` an EP rank (PP = 1, EP > 1 in the saved args)?"""
    args = read_args(step_dir / "mp_rank_00_000" / FILE)
    return args_get(args, "pipeline_model_parallel_size", 1) == 1 and args_get(args, "expert_model_parallel_size", 1) > 1


def grid_from_args(lay, args: Any, *, pp: int, vpp: int, ep: int, where: Path):
    """The :class:`~mindspeed_ckpt.placement.Grid` a legacy checkpoint was saved with, from its ``args``
    (``num_layers``, ``num_layer_list`` / ``decoder_first/last_pipeline_num_layers``, ``noop_layers``)."""
    from mindspeed_ckpt.placement import Grid, stage_layer_counts
    from mindspeed_ckpt.plan import parse_noop_layers

    noop = parse_noop_layers(args_get(args, "noop_layers"))
    total = lay.num_layers + len(noop)
    saved = args_get(args, "num_layers")
    if saved is not None and saved != total:
        raise ValueError(f"{where}: args.num_layers={saved} but config.json says num_hidden_layers={lay.num_layers}"
                         f"{f' (+ {len(noop)} noop layers)' if noop else ''}; pass the matching --hf-config")
    text = args_get(args, "num_layer_list")
    try:
        layer_list = tuple(int(x) for x in str(text).split(",")) if text else None
    except ValueError:
        raise ValueError(f"{where}: saved args.num_layer_list={text!r} is not a comma list of integers") from None
    counts = stage_layer_counts(total, pp, layer_list=layer_list, first=args_get(args, "decoder_first_pipeline_num_layers"),
                                last=args_get(args, "decoder_last_pipeline_num_layers"))
    return Grid(counts, vpp=vpp, ep=ep, experts=lay.dims.get("experts", 0), mtp=lay.num_mtp, tied="tied" in lay.features,
                noop=noop)  # fmt: skip
