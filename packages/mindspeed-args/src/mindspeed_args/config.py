"""The validated configuration as frozen objects grouped by concern.

``cfg.parallel.context_parallel_size``, ``cfg.moe.num_experts``, ``cfg.derived.data_parallel_size``.
Each group is a frozen dataclass generated from the schema (one field per parameter, typed);
lists become tuples and mappings read-only, so nothing downstream can mutate the config.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Optional

from mindspeed_args.groups import GROUPS
from mindspeed_args.rules.base import DERIVED
from mindspeed_args.schema import Schema, load_schema

_PY = {"bool": bool, "int": int, "float": float, "str": str, "json": Any,
       "list[str]": tuple[str, ...], "list[int]": tuple[int, ...], "list[float]": tuple[float, ...]}


def freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    return value


@functools.lru_cache(maxsize=1)
def group_classes() -> dict[str, type]:
    """One frozen dataclass per group, generated once from the schema."""
    schema = load_schema()
    out = {}
    for g in GROUPS:
        params = [p for p in schema.params.values() if p.group == g.name]
        fields = [(p.name, Optional[_PY[p.type]], dataclasses.field(default=None)) for p in params]
        cls = dataclasses.make_dataclass(f"{g.name.title().replace('_', '')}Config", fields, frozen=True)
        cls.__doc__ = f"{g.title_en} parameters ({len(params)})."
        out[g.name] = cls
    derived = [(n, Optional[int], dataclasses.field(default=None)) for n in DERIVED]
    out["derived"] = dataclasses.make_dataclass("DerivedConfig", derived, frozen=True)
    return out


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated launch configuration. Attribute access by group: ``cfg.<group>.<name>``."""

    dialect: str
    groups: Mapping[str, Any]
    explicit: frozenset[str]

    def __getattr__(self, name: str) -> Any:
        groups = object.__getattribute__(self, "groups")
        if name in groups:
            return groups[name]
        raise AttributeError(f"Config has no group {name!r}; groups: {', '.join(groups)}")

    def get(self, name: str) -> Any:
        """A parameter's value by canonical name, whatever its group."""
        schema = load_schema()
        group = schema[name].group if name in schema else "derived"
        return getattr(self.groups[group], name)

    def as_dict(self) -> dict[str, Any]:
        """Every canonical parameter name -> value (derived values excluded)."""
        return {f.name: getattr(obj, f.name) for g, obj in self.groups.items() if g != "derived"
                for f in dataclasses.fields(obj)}


def build_config(schema: Schema, values: Mapping[str, Any], dialect: str, explicit: frozenset[str]) -> Config:
    classes = group_classes()
    by_group: dict[str, dict[str, Any]] = {g: {} for g in classes}
    for name, value in values.items():
        group = schema[name].group if name in schema else "derived"
        by_group[group][name] = freeze(value)
    groups = {g: cls(**by_group[g]) for g, cls in classes.items()}
    return Config(dialect=dialect, groups=MappingProxyType(groups), explicit=explicit)
