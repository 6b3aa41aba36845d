"""Resolve a launch (config file + flags + environment) to canonical values and validate it.

    report = validate(["--seq-length", "4096", ...], dialect="megatron")
    report.ok, report.violations, report.notices, report.config.parallel.context_parallel_size
    cfg = parse_args([...])          # a Config, or ConfigError listing every violation
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mindspeed_args.config import Config, build_config
from mindspeed_args.derive import Notice, derive
from mindspeed_args.dialects import Parsed, env, fsdp2, megatron, swift
from mindspeed_args.documents import load_document, looks_like_fsdp2, parse_canonical
from mindspeed_args.errors import ConfigError, UsageError
from mindspeed_args.implemented import implementer
from mindspeed_args.rules import RULES, Violation
from mindspeed_args.schema import Param, Schema, load_schema
from mindspeed_args.values import element_type, same, to_text

FLAG_READERS = {"megatron": megatron.parse, "swift": swift.parse}


@dataclass(frozen=True)
class Resolved:
    """Every canonical parameter's value for one launch, and which ones the input set."""

    dialect: str
    values: Mapping[str, Any]
    explicit: Mapping[str, Any]  # name -> value as the input set it (before derivation)
    sources: Mapping[str, str]


@dataclass(frozen=True)
class Report:
    resolved: Resolved
    violations: tuple[Violation, ...]
    notices: tuple[Notice, ...]
    config: Config

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def read_inputs(schema: Schema, dialect: str, argv: Sequence[str], config: str | None,
                environ: Mapping[str, str] | None) -> Parsed:
    """Parse config file, then flags (which override it), then the documented environment
    variables. Raises UsageError listing every unusable piece of input."""
    if dialect not in ("megatron", "swift", "fsdp2"):
        raise UsageError(f"--dialect must be megatron, swift or fsdp2, not {dialect!r}")
    parsed = Parsed()
    if config is not None:
        data = load_document(config)
        if dialect == "fsdp2":
            parsed.merge(fsdp2.parse(schema, data, config))
        elif looks_like_fsdp2(data):
            raise UsageError(f"{config} has FSDP2 sections; validate it with --dialect fsdp2")
        else:
            parsed.merge(parse_canonical(schema, data, config))
    elif dialect == "fsdp2":
        raise UsageError("the fsdp2 dialect reads a YAML file: pass --config FILE")
    if argv:
        if dialect == "fsdp2":
            raise UsageError("the fsdp2 dialect takes its parameters from --config FILE, not from flags")
        parsed.merge(FLAG_READERS[dialect](schema, list(argv)))
    parsed.merge(env.parse(schema, os.environ if environ is None else environ))
    if parsed.problems:
        raise UsageError(parsed.problems)
    return parsed


def resolve(schema: Schema, dialect: str, parsed: Parsed) -> Resolved:
    values = {p.name: p.default_for(dialect) for p in schema.params.values()}
    values.update(parsed.values)
    return Resolved(dialect, values, dict(parsed.values), dict(parsed.sources))


def value_violations(schema: Schema, resolved: Resolved) -> list[Violation]:
    """Choices, ranges and required keys, straight from the schema."""
    out = []
    for p in schema.params.values():
        value = resolved.values.get(p.name)
        problem = value_problem(p, value, resolved.dialect)
        if problem:
            out.append(Violation(f"value.{problem[0]}", "schema", {p.name: value}, problem[1], problem[2]))
    return out


def value_problem(p: Param, value: Any, dialect: str) -> tuple[str, str, str] | None:
    """(kind, constraint, fix) when ``value`` breaks the schema's required/choices/range for
    ``dialect``; None when it is fine."""
    sp = p.spellings.get(dialect)
    if value is None:
        if sp is not None and sp.required:
            return ("required", f"{sp.display} is required in the {dialect} dialect", f"set {sp.display}")
        return None
    items = value if element_type(p.type) and isinstance(value, list) else [value]
    choices = p.choices_for(dialect)
    if choices:
        bad = [v for v in items if not any(same(v, c) for c in choices)]
        if bad:
            shown = ", ".join(to_text(c) for c in choices if c is not None)
            return ("choices", f"{to_text(bad[0])} is not one of: {shown}", f"use one of: {shown}")
    if p.range and p.type in ("int", "float", "list[int]", "list[float]"):
        low, high = p.range
        bad = [v for v in items if (low is not None and v < low) or (high is not None and v > high)]
        if bad:
            span = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            return ("range", f"{p.name} must be in {span}", f"set {p.name} within {span}")
    return None


def unimplemented(schema: Schema, resolved: Resolved) -> list[Violation]:
    """Explicitly set, not at this dialect's default, and no package implements it."""
    out = []
    for name, value in resolved.explicit.items():
        p = schema[name]
        default = p.default_for(resolved.dialect)
        if p.group == "env" or same(value, default) or implementer(name):
            continue
        owner = f"planned in {p.owner}" if p.owner else "not planned in this monorepo"
        out.append(Violation(
            "not-implemented", "mindspeed_args.implemented", {name: value},
            f"{name} is not implemented yet ({owner})", f"leave {name} at its default ({to_text(default)})"))
    return out


def validate(argv: Sequence[str] = (), dialect: str = "megatron", config: str | None = None,
             environ: Mapping[str, str] | None = None, world_size: int | None = None) -> Report:
    """Validate a launch. Raises UsageError for unusable input; violations are in the report.
    ``world_size`` defaults to $WORLD_SIZE (set by torchrun) when present."""
    schema = load_schema()
    parsed = read_inputs(schema, dialect, argv, config, environ)
    resolved = resolve(schema, dialect, parsed)
    env_map = os.environ if environ is None else environ
    if world_size is None and str(env_map.get("WORLD_SIZE", "")).isdigit():
        world_size = int(env_map["WORLD_SIZE"])
    values = dict(resolved.values)
    notices = derive(values, dialect, world_size)
    resolved = Resolved(dialect, values, resolved.explicit, resolved.sources)
    violations = [v for rule in RULES if (v := rule.check(values))]
    violations += value_violations(schema, resolved) + unimplemented(schema, resolved)
    config_obj = build_config(schema, values, dialect, frozenset(resolved.explicit))
    return Report(resolved, tuple(violations), tuple(notices), config_obj)


def parse_args(argv: Sequence[str] = (), dialect: str = "megatron", config: str | None = None,
               environ: Mapping[str, str] | None = None, world_size: int | None = None) -> Config:
    """Validate and return the frozen Config; raises ConfigError (with the report) on violations."""
    report = validate(argv, dialect, config, environ, world_size)
    if not report.ok:
        raise ConfigError(report)
    return report.config
