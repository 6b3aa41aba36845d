"""Translate a launch between dialects (megatron <-> swift <-> fsdp2).

Every parameter whose value differs from the target dialect's default is written, so the
translated launch means the same thing even where the two guides' defaults differ. Three
FSDP2 keys have no one-to-one Megatron flag and are mapped by the explicit table COMPOUNDS.
The output is parsed back in the target dialect and must give the same values.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from mindspeed_args.derive import data_parallel_size
from mindspeed_args.dialects import fsdp2, megatron, swift
from mindspeed_args.dialects.flags import read_flags_file, split_shell
from mindspeed_args.errors import UsageError
from mindspeed_args.schema import Schema, load_schema
from mindspeed_args.validate import read_inputs, resolve, value_problem
from mindspeed_args.values import same, to_text


@dataclass
class Translation:
    """The target launch text, with notes for the reader (stderr) on what was computed."""

    text: str
    notes: list[str] = field(default_factory=list)


@dataclass
class _Work:
    values: dict[str, Any]
    explicit: set[str]
    world_size: int | None
    accounted: set[str] = field(default_factory=set)
    computed: set[str] = field(default_factory=set)  # set by a compound mapping
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _batch_from_fsdp2(w: _Work) -> None:
    w.accounted.add("gradient_accumulation_steps")
    dp = data_parallel_size(w.values, w.world_size)
    if dp is None:
        w.problems.append("global batch = data-parallel size x per_device_train_batch_size x "
                          "gradient_accumulation_steps: pass --world-size N (number of devices)")
        return
    accum = w.values.get("gradient_accumulation_steps") or 1
    w.values["global_batch_size"] = dp * w.values["micro_batch_size"] * accum
    w.computed.add("global_batch_size")
    w.notes.append(f"global_batch_size = data-parallel {dp} x per-device {w.values['micro_batch_size']} x accumulation {accum}")


def _batch_to_fsdp2(w: _Work) -> None:
    w.accounted.add("global_batch_size")
    gbs, mbs = w.values.get("global_batch_size"), w.values.get("micro_batch_size") or 1
    dp = data_parallel_size(w.values, w.world_size)
    if gbs is None:
        return
    if dp is None or gbs % (mbs * dp):
        w.problems.append(f"global_batch_size={gbs} becomes gradient_accumulation_steps = gbs / (micro batch x "
                          "data-parallel size): pass --world-size N so that it divides evenly")
        return
    w.values["gradient_accumulation_steps"] = gbs // (mbs * dp)
    w.computed.add("gradient_accumulation_steps")
    w.notes.append(f"gradient_accumulation_steps = {gbs} / ({mbs} x data-parallel {dp})")


def _recompute_from_fsdp2(w: _Work) -> None:
    w.accounted.add("recompute")
    if w.values.get("recompute"):
        w.values.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        w.computed.update(("recompute_granularity", "recompute_method", "recompute_num_layers"))


def _recompute_to_fsdp2(w: _Work) -> None:
    keys = ("recompute_granularity", "recompute_method", "recompute_num_layers")
    w.accounted.update(keys)
    g, m, n = (w.values.get(k) for k in keys)
    if g is None or (g == "selective" and "recompute_granularity" not in w.explicit):
        return
    if (g, m, n) == ("full", "uniform", 1):
        w.values["recompute"] = True
        w.computed.add("recompute")
    else:
        w.problems.append(f"recompute_granularity={g}, recompute_method={m}, recompute_num_layers={n}: FSDP2 "
                          "'recompute' only means full recompute of every layer (full/uniform/1)")


def _dataset_from_fsdp2(w: _Work) -> None:
    w.accounted.add("dataset")
    ds = w.values.get("dataset")
    if isinstance(ds, str):
        w.values["data_path"] = [ds]
        w.computed.add("data_path")
    elif ds is not None:
        w.problems.append("an inline FSDP2 dataset configuration has no --data-path equivalent; give a path")


def _dataset_to_fsdp2(w: _Work) -> None:
    w.accounted.add("data_path")
    paths = w.values.get("data_path")
    if paths and len(paths) == 1:
        w.values["dataset"] = paths[0]
        w.computed.add("dataset")
    elif paths:
        w.problems.append(f"data_path has {len(paths)} items (a blend); FSDP2 dataset takes one path")


# (name, from fsdp2 to the flag dialects, from the flag dialects to fsdp2)
COMPOUNDS: tuple[tuple[str, Callable[[_Work], None], Callable[[_Work], None]], ...] = (
    ("recompute", _recompute_from_fsdp2, _recompute_to_fsdp2),
    ("global batch", _batch_from_fsdp2, _batch_to_fsdp2),
    ("dataset", _dataset_from_fsdp2, _dataset_to_fsdp2),
)


def _carry(schema: Schema, w: _Work, src: str, dst: str) -> dict[str, Any]:
    """Values to write: those differing from the target's defaults. A value the user set that the
    target cannot express is a problem; a source-dialect *default* the target cannot express
    (no such key, or outside its choices) is left to the target's own default, with a note."""
    out = {}
    for name, value in w.values.items():
        p = schema[name]
        if name in w.accounted or p.group == "env" or same(value, p.default_for(dst)):
            continue
        if not (_expressible(p, src) or name in w.computed):
            continue  # the source dialect has no say in it
        if value is None and dst == "megatron" and name not in w.explicit:
            w.notes.append(f"{name}: unset in the source; megatron flags cannot unset it, so megatron's default "
                           f"{to_text(p.default_for(dst))} applies")
            continue
        if _expressible(p, dst):
            found = value_problem(p, value, dst)
            problem = found[1] if found else None
        else:
            problem = "has no key there"
        if problem and name not in w.explicit:
            if _expressible(p, dst):
                w.notes.append(f"{name}: the source default {to_text(value)} is not valid in {dst}; "
                               f"keeping {dst}'s default {to_text(p.default_for(dst))}")
            continue
        if problem:
            w.problems.append(f"cannot express in {dst}: {name}={to_text(value)} ({problem})")
            continue
        out[name] = value
    return out


def _expressible(p, dst: str) -> bool:
    return dst in p.spellings or (dst == "swift" and "megatron" in p.spellings)


def _render(schema: Schema, dst: str, values: dict[str, Any]) -> tuple[str, list[str]]:
    if dst == "fsdp2":
        doc, problems = fsdp2.render(schema, values)
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), problems
    argv, problems = (megatron if dst == "megatron" else swift).render(schema, values)
    lines: list[list[str]] = []
    for tok in argv:  # one flag and its values per line
        if tok.startswith("--"):
            lines.append([tok])
        else:
            lines[-1].append(shlex.quote(tok))
    return " \\\n".join("    " + " ".join(line) for line in lines) + "\n", problems


def convert(src: str, dst: str, path: str | None = None, argv: Sequence[str] = (),
            world_size: int | None = None) -> Translation:
    """Translate the launch in ``path`` (fsdp2 YAML, or a flags file) and/or ``argv``."""
    schema = load_schema()
    if src not in ("megatron", "swift", "fsdp2") or dst not in ("megatron", "swift", "fsdp2"):
        raise UsageError("--from and --to take megatron, swift or fsdp2")
    flags = list(argv)
    config = None
    if path is not None:
        if src == "fsdp2":
            config = path
        else:
            flags = read_flags_file(path) + flags
    parsed = read_inputs(schema, src, flags, config, environ={})
    w = _Work(dict(resolve(schema, src, parsed).values), set(parsed.values), world_size)
    if src == "fsdp2" and dst != "fsdp2":
        for _, forward, _ in COMPOUNDS:
            forward(w)
    elif dst == "fsdp2" and src != "fsdp2":
        for _, _, backward in COMPOUNDS:
            backward(w)
    carried = _carry(schema, w, src, dst)
    text, problems = _render(schema, dst, carried)
    problems = w.problems + [f"cannot express in {dst}: {p}" for p in problems]
    if problems:
        raise UsageError(problems)
    _check_round_trip(schema, dst, text, carried)
    return Translation(text, w.notes)


def _check_round_trip(schema: Schema, dst: str, text: str, carried: dict[str, Any]) -> None:
    if dst == "fsdp2":
        back = fsdp2.parse(schema, yaml.safe_load(text) or {}, "translation")
    else:
        back = (megatron if dst == "megatron" else swift).parse(schema, split_shell(text), "translation")
    lost = [f"{n}={to_text(v)}" for n, v in carried.items() if not same(back.values.get(n, schema[n].default_for(dst)), v)]
    if back.problems or lost:
        raise UsageError([f"internal: translation does not read back: {x}" for x in back.problems + lost])
