"""The parameter schema: every parameter of the seed guides, merged by canonical name.

Data lives in ``params/*.yaml`` (one file per guide, see ``params/README.md``). Each file states
what one guide says about its parameters in one dialect; :func:`load_schema` merges them. A
parameter documented by several guides keeps each dialect's own spelling and default.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Any

import yaml

from mindspeed_args.errors import SchemaError
from mindspeed_args.groups import GROUPS_BY_NAME
from mindspeed_args.values import TYPES, check_value

DIALECTS = ("megatron", "swift", "fsdp2", "env")
# Which file wins when two guides of the same dialect disagree (first wins). MindSpeed's own
# parsers override Megatron-LM's defaults, so the seeds come before megatron-core.
SOURCE_PRIORITY = ("000", "002", "003", "001", "megatron-core")
FSDP2_SECTIONS = ("ModelArguments", "DataArguments", "ParallelArguments", "TrainingArguments")


@dataclass(frozen=True)
class Spelling:
    """How one dialect writes a parameter, and that dialect's default."""

    dialect: str
    name: str                       # '--seq-length', 'seq_length', 'cutoff_len', 'HCCL_CONNECT_TIMEOUT'
    default: Any
    section: str | None = None      # fsdp2 only
    values: Mapping[str, Any] = field(default_factory=dict)  # dialect value -> canonical value
    choices: tuple | None = None    # choices as this dialect documents them (canonical values)
    required: bool = False
    source_defaults: Mapping[str, Any] = field(default_factory=dict)  # source id -> default it states

    @property
    def display(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name

    def to_canonical(self, value: Any) -> Any:
        return map_value(self.values, value)

    def from_canonical(self, value: Any) -> Any:
        return map_value({v: k for k, v in self.values.items()}, value)


def map_value(vmap: Mapping, value: Any) -> Any:
    """Apply a value map to a scalar or to each item of a list. Booleans are never mapped
    (True == 1 as a dict key)."""
    if isinstance(value, list):
        return [map_value(vmap, v) for v in value]
    if value is None or (isinstance(value, (str, int)) and not isinstance(value, bool)):
        return vmap.get(value, value)
    return value


@dataclass(frozen=True)
class Param:
    """One canonical parameter. ``default`` is the megatron dialect's (else the first dialect's)."""

    name: str
    type: str
    group: str
    help_en: str
    help_zh: str
    spellings: Mapping[str, Spelling]
    sources: tuple[str, ...]
    choices: tuple | None = None
    range: tuple | None = None
    nargs: str = "+"
    notes: tuple[str, ...] = ()

    @property
    def default(self) -> Any:
        first = next(d for d in DIALECTS if d in self.spellings)
        return self.spellings[first].default

    def default_for(self, dialect: str) -> Any:
        """The default a launch in ``dialect`` gets. Swift passes unknown parameters straight
        to Megatron (megatron_extra_kwargs), so it inherits Megatron's defaults."""
        if dialect in self.spellings:
            return self.spellings[dialect].default
        if dialect == "swift" and "megatron" in self.spellings:
            return self.spellings["megatron"].default
        return self.default

    def choices_for(self, dialect: str) -> tuple | None:
        sp = self.spellings.get(dialect)
        return sp.choices if sp is not None and sp.choices is not None else self.choices

    @property
    def owner(self) -> str | None:
        return GROUPS_BY_NAME[self.group].owner

    @property
    def defaults_differ(self) -> bool:
        defaults = [sp.default for sp in self.spellings.values()]
        return any(d != defaults[0] for d in defaults[1:])


class Schema:
    """All parameters, with look-ups by canonical name and by any dialect spelling."""

    def __init__(self, params: Mapping[str, Param], files: tuple[str, ...]):
        self.params = MappingProxyType(dict(params))
        self.files = files
        self._by_spelling: dict[tuple[str, str], Param] = {}
        for p in params.values():
            for sp in p.spellings.values():
                self._by_spelling[(sp.dialect, sp.name)] = p

    def __getitem__(self, name: str) -> Param:
        return self.params[name]

    def __contains__(self, name: object) -> bool:
        return name in self.params

    def __len__(self) -> int:
        return len(self.params)

    def by_spelling(self, dialect: str, spelling: str) -> Param | None:
        return self._by_spelling.get((dialect, spelling))

    def in_dialect(self, dialect: str) -> list[Param]:
        return [p for p in self.params.values() if dialect in p.spellings]

    def find(self, text: str) -> Param | None:
        """Resolve any spelling: canonical name, '--flag', swift key, 'Section.key' or ENV_NAME."""
        text = text.strip()
        if text in self.params:
            return self.params[text]
        key = text.split(".", 1)[1] if text.split(".", 1)[0] in FSDP2_SECTIONS else text
        for dialect in DIALECTS:
            hit = self._by_spelling.get((dialect, key))
            if hit:
                return hit
        normal = text.lstrip("-").replace("-", "_")
        return self.params.get(normal) or self._by_spelling.get(("megatron", "--" + normal.replace("_", "-")))


def _spelling_name(dialect: str, entry: dict) -> str:
    if dialect == "megatron":
        return entry.get("flag") or "--" + entry["name"].replace("_", "-")
    if dialect == "fsdp2":
        return entry.get("key") or entry["name"]
    return entry.get("flag") or entry["name"]


class _Builder:
    """Accumulates entries of several files for one canonical name."""

    def __init__(self, name: str):
        self.name = name
        self.entries: list[tuple[str, str, dict]] = []  # (source, dialect, entry)

    def build(self) -> Param:
        order = sorted(self.entries, key=lambda e: SOURCE_PRIORITY.index(e[0]))
        first = order[0][2]
        types = {e["type"] for _, _, e in order}
        if len(types) > 1:
            raise SchemaError(f"parameter {self.name}: guides disagree on type {sorted(types)}")
        spellings = {}
        for dialect in DIALECTS:
            mine = [(s, e) for s, d, e in order if d == dialect]
            if mine:
                spellings[dialect] = self._spelling(dialect, mine)
        all_choices = [c for _, _, e in order for c in _canonical_choices(e)]
        choices = tuple(dict.fromkeys(all_choices)) if any(e.get("choices") for _, _, e in order) else None
        return Param(
            name=self.name, type=first["type"], group=first["group"],
            help_en=next((e["en"] for _, _, e in order if e.get("en")), ""),
            help_zh=next((e["zh"] for _, _, e in order if e.get("zh")), ""),
            spellings=MappingProxyType(spellings),
            sources=tuple(dict.fromkeys(s for s, _, _ in order)),
            choices=choices, range=_tightest(self.name, [e.get("range") for _, _, e in order]),
            nargs=first.get("nargs", "+"),
            notes=tuple(f"[{s}] {e['note']}" for s, _, e in order if e.get("note")),
        )

    def _spelling(self, dialect: str, mine: list[tuple[str, dict]]) -> Spelling:
        names = {_spelling_name(dialect, e) for _, e in mine}
        if len(names) > 1:
            raise SchemaError(f"parameter {self.name}: dialect {dialect} spelled {sorted(names)}")
        source, entry = mine[0]
        values: dict = {}
        for _, e in mine:
            values.update(e.get("values") or {})
        choices = [c for _, e in mine for c in _canonical_choices(e)]
        return Spelling(
            dialect=dialect, name=names.pop(), default=map_value(values, entry.get("default")),
            section=entry.get("section"), values=MappingProxyType(values),
            choices=tuple(dict.fromkeys(choices)) if choices else None,
            required=any(e.get("required") for _, e in mine),
            source_defaults=MappingProxyType({s: map_value(values, e.get("default")) for s, e in mine}),
        )


def _canonical_choices(entry: dict) -> list:
    """An entry's choices in canonical spelling (applying its dialect value map)."""
    return [map_value(entry.get("values") or {}, c) for c in (entry.get("choices") or ())]


def _tightest(name: str, ranges: list) -> tuple | None:
    ranges = [r for r in ranges if r]
    if not ranges:
        return None
    lows = [r[0] for r in ranges if r[0] is not None]
    highs = [r[1] for r in ranges if r[1] is not None]
    low, high = (max(lows) if lows else None), (min(highs) if highs else None)
    if low is not None and high is not None and low > high:
        raise SchemaError(f"parameter {name}: ranges {ranges} do not overlap")
    return (low, high)


def _check_entry(path: str, dialect: str, e: dict) -> None:
    where = f"{path}: {e.get('name')!r}"
    if e.get("type") not in TYPES:
        raise SchemaError(f"{where}: unknown type {e.get('type')!r}")
    if e.get("group") not in GROUPS_BY_NAME:
        raise SchemaError(f"{where}: unknown group {e.get('group')!r}")
    problem = check_value(e["type"], e.get("default"))
    if problem:
        raise SchemaError(f"{where}: default {problem}")
    if dialect == "fsdp2" and e.get("section") not in FSDP2_SECTIONS:
        raise SchemaError(f"{where}: fsdp2 entries need a section in {FSDP2_SECTIONS}")


def _read_files() -> list[tuple[str, dict]]:
    out = []
    for item in sorted(resources.files("mindspeed_args").joinpath("params").iterdir(), key=lambda p: p.name):
        if item.name.endswith(".yaml"):
            out.append((item.name, yaml.safe_load(item.read_text(encoding="utf-8"))))
    return out


@functools.lru_cache(maxsize=1)
def load_schema() -> Schema:
    """Load and merge every packaged parameter file. Cached; raises SchemaError on bad data."""
    builders: dict[str, _Builder] = {}
    files = []
    for fname, data in _read_files():
        source, dialect = str(data["source"]), data["dialect"]
        if source not in SOURCE_PRIORITY or dialect not in DIALECTS:
            raise SchemaError(f"params/{fname}: unknown source {source!r} or dialect {dialect!r}")
        files.append(fname)
        seen = set()
        for entry in data["params"]:
            _check_entry(f"params/{fname}", dialect, entry)
            if entry["name"] in seen:
                raise SchemaError(f"params/{fname}: {entry['name']} listed twice")
            seen.add(entry["name"])
            builders.setdefault(entry["name"], _Builder(entry["name"])).entries.append((source, dialect, entry))
    params = {name: b.build() for name, b in sorted(builders.items())}
    schema = Schema(params, tuple(files))
    _check_spellings_unique(params)
    return schema


def _check_spellings_unique(params: Mapping[str, Param]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for p in params.values():
        for sp in p.spellings.values():
            key = (sp.dialect, sp.name)
            if key in seen:
                raise SchemaError(f"{sp.dialect} spelling {sp.name!r} used by both {seen[key]} and {p.name}")
            seen[key] = p.name
