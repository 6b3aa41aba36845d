"""Torch-free planning shared by the converters: output staging, HF name checks, the PP/VPP/EP
grid and per-stage placement of rules. Importing this module imports neither torch nor numpy,
so the fast path (:mod:`mindspeed_ckpt.fastpath`) and the torch path share one set of checks."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mindspeed_ckpt import maps
from mindspeed_ckpt.placement import Grid, Slot, stage_layer_counts
from mindspeed_ckpt.sharding import check_tp, padded_vocab_size

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3
# Where tensor data starts in the files we write (safetensors data section, rank-file storages of the
# fast path): page-aligned, so a copy between two such files moves whole pages, which the kernel's
# copy_file_range does with ~1/3 less CPU than the same bytes at different offsets within a page.
PAGE_ALIGNMENT = 4096


def read_weight_map(directory: Path) -> dict[str, str] | None:
    """The ``weight_map`` of ``directory``'s safetensors index (None without an index); ValueError
    when it is malformed or names a shard that is not there."""
    index = directory / INDEX
    if not index.exists():
        return None
    wm = read_json(index).get("weight_map")
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
    for shard in sorted(set(wm.values())):
        if not (directory / shard).is_file():
            raise ValueError(f"{directory / shard}: shard listed in {INDEX} not found")
    return dict(wm)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; ValueError naming the file when missing or not a JSON object."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def side_files(src: Path) -> Iterator[Path]:
    """The non-weight files of an HF directory (config, generation config, tokenizer files)."""
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != INDEX and not p.name.endswith(".partial"):
            yield p


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy :func:`side_files` of ``src`` into ``dst`` (created)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in side_files(src):
        shutil.copy2(p, dst / p.name)


# Megatron's legacy layout (see mindspeed_ckpt.megatron_io)
TRACKER = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
HF_CONFIG_DIR = "hf_config"  # where hf_to_mcore keeps config.json and tokenizer files inside the megatron dir


def iteration_dir(iteration: int | str) -> str:
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """Megatron's rank directory name: ``mp_rank_TT``, ``_PPP`` when PP > 1, ``_EEE`` when EP > 1."""
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep == 1 else f"{name}_{ep_rank:03d}"


def model_keys(vpp: int) -> list[str]:
    """The state-dict keys of a rank file: ``model``, or ``model0..model{vpp-1}`` with VPP."""
    return ["model"] if vpp == 1 else [f"model{c}" for c in range(vpp)]


def write_tracker(root: Path, iteration: int) -> None:
    (root / TRACKER).write_text(f"{iteration}\n", encoding="utf-8")


@contextmanager
def staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling directory of ``out``, renamed to ``out`` when the block succeeds
    and removed when it fails. Refuses an existing ``out`` unless ``overwrite``."""
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _default_modes(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _default_modes(root: Path) -> None:
    """Give the staged tree the modes a plain mkdir/open would have (mkdtemp/mkstemp make them
    private: 0700 / 0600), so the published checkpoint is readable as the user's umask says."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def check_hf_names(reader: Any, rule_list: list[maps.Rule]) -> None:
    have = set(reader.names)
    for rule in rule_list:
        for name in rule.hf:
            if name not in have and not rule.optional:
                hint = ""
                if rule.mcore.startswith("mtp."):  # transformers neither builds nor saves MTP layers
                    hint = "; checkpoints saved by transformers have no MTP layers: set num_nextn_predict_layers to 0"
                raise ValueError(f"{reader.dir}: missing tensor {name!r} (needed for megatron {rule.mcore!r}){hint}")
    known = {n for r in rule_list for n in r.hf}
    ignored = maps.ignored_hf(reader.config)
    extra = sorted(n for n in have if n not in known and not ignored(n))
    if extra:
        raise ValueError(f"{reader.dir}: unexpected tensor {extra[0]!r} ({len(extra)} in all) for model_type "
                         f"{reader.config['model_type']!r}; check that config.json matches the weights")


def placements(rule_list: list[maps.Rule], grid: Grid) -> list[list[tuple[maps.Rule, Slot]]]:
    """Per pipeline stage, the (rule, slot) pairs its rank files hold (copies included: a tied
    embedding's ``output_layer`` copy and the MTP embedding copy on the last stage)."""
    out: list[list[tuple[maps.Rule, Slot]]] = [[] for _ in range(grid.pp)]
    for rule in rule_list:
        if not rule.alias:
            for slot in grid.place(rule.mcore):
                out[slot.stage].append((rule, slot))
    return out


def parse_layer_list(value: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"1,3"`` or ``[1, 3]`` -> ``(1, 3)``; ValueError naming --num-layer-list otherwise."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        return tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"--num-layer-list {value!r}: expected comma-separated layer counts, e.g. 1,3") from None


def parse_noop_layers(value: str | Sequence[int] | None) -> tuple[int, ...]:
    """``--noop-layers 61,62,63`` (megatron layer indices) -> sorted tuple; () when unset."""
    if value is None or value == "":
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = tuple(sorted(int(p) for p in parts))
    except (TypeError, ValueError):
        raise ValueError(f"--noop-layers {value!r}: expected comma-separated layer indices, e.g. 61,62,63") from None
    if len(set(out)) != len(out) or out[0] < 0:
        raise ValueError(f"--noop-layers {','.join(map(str, out))}: layer indices must be distinct and >= 0")
    return out


def plan_grid(lay: maps.Layout, *, pp: int, vpp: int, ep: int, layer_list: tuple[int, ...] | None,
              first: int | None, last: int | None, noop: tuple[int, ...] = ()) -> Grid:
    """The output grid; with ``noop`` layers megatron holds num_hidden_layers + len(noop) layers."""
    if vpp > 1 and (pp < 2 or layer_list or first is not None or last is not None):
        raise ValueError(f"--vpp {vpp} needs --pp > 1 and an even layer split (no --num-layer-list or "
                         "--decoder-first/last-pipeline-num-layers)")
    counts = stage_layer_counts(lay.num_layers + len(noop), pp, layer_list=layer_list, first=first, last=last)
    return Grid(counts, vpp=vpp, ep=ep, experts=lay.dims.get("experts", 0), mtp=lay.num_mtp, tied="tied" in lay.features,
                noop=noop)  # fmt: skip


@dataclass(frozen=True)
class OutputPlan:
    """What every writer of a legacy checkpoint needs about its output layout: the grid, the
    padded vocabulary, the rules at that padding, and the layer-split flags to record in args."""

    grid: Grid
    padded: int
    rules: list
    layer_list: tuple[int, ...] | None
    first: int | None
    last: int | None


def plan_output(cfg: dict, lay: maps.Layout, *, tp: int, pp: int, vpp: int, ep: int, num_layer_list, first: int | None,
                last: int | None, noop_layers, divisible_by: int) -> OutputPlan:
    """Check ``tp`` against the model's sizes and plan the output layout (shared by hf-to-mcore on both
    paths and reshard); ValueError naming the flag to fix."""
    check_tp(dict(lay.dims), tp)
    layers = parse_layer_list(num_layer_list)
    grid = plan_grid(lay, pp=pp, vpp=vpp, ep=ep, layer_list=layers, first=first, last=last,
                     noop=parse_noop_layers(noop_layers))  # fmt: skip
    padded = padded_vocab_size(lay.dims["vocab"], divisible_by, tp)
    return OutputPlan(grid, padded, maps.rules(cfg, padded_vocab_size=padded), layers, first, last)
