"""The fsdp2 dialect: MindSpeed-LLM's FSDP2 YAML (ModelArguments / DataArguments /
ParallelArguments / TrainingArguments sections, seed 001)."""

from __future__ import annotations

import difflib
from typing import Any

from mindspeed_args.dialects import Parsed
from mindspeed_args.schema import FSDP2_SECTIONS, Schema
from mindspeed_args.suggest import unknown
from mindspeed_args.values import coerce, same

DIALECT = "fsdp2"


def _keys_by_section(schema: Schema) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {s: {} for s in FSDP2_SECTIONS}
    for p in schema.in_dialect(DIALECT):
        sp = p.spellings[DIALECT]
        out[sp.section][sp.name] = p.name
    return out


def parse(schema: Schema, data: Any, where: str) -> Parsed:
    """Read a loaded YAML mapping of sections; every unknown section/key is reported."""
    out = Parsed()
    if not isinstance(data, dict):
        out.problems.append(f"{where}: expected a mapping of sections {', '.join(FSDP2_SECTIONS)}")
        return out
    sections = _keys_by_section(schema)
    for section, body in data.items():
        if section not in sections:
            close = [s for s in FSDP2_SECTIONS if s.lower().startswith(str(section).lower())]
            close = close or difflib.get_close_matches(str(section), FSDP2_SECTIONS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; sections are {', '.join(FSDP2_SECTIONS)}"
            out.problems.append(f"{where}: unknown fsdp2 section {section!r}{hint}")
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            out.problems.append(f"{where}: section {section} must be a mapping of keys")
            continue
        for key, raw in body.items():
            _read_key(schema, sections, section, str(key), raw, out, where)
    return out


def _read_key(schema, sections, section, key, raw, out: Parsed, where: str) -> None:
    name = sections[section].get(key)
    if name is None:
        home = next((s for s, keys in sections.items() if key in keys), None)
        if home:
            out.problems.append(f"{where}: key {key!r} belongs in section {home}, not {section}")
        else:
            out.problems.append(f"{where}: {section}: " + unknown(schema, DIALECT, key, "key"))
        return
    p = schema[name]
    try:
        out.set(name, p.spellings[DIALECT].to_canonical(coerce(p.type, raw)), where)
    except ValueError as exc:
        out.problems.append(f"{where}: {section}.{key} {exc}")


def render(schema: Schema, values: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Sections for the values that differ from FSDP2 defaults (required keys always written)."""
    doc: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for name, value in values.items():
        p = schema[name]
        sp = p.spellings.get(DIALECT)
        if sp is None:
            problems.append(f"{name} has no fsdp2 key")
            continue
        if same(value, sp.default) and not sp.required:
            continue
        doc.setdefault(sp.section, {})[sp.name] = sp.from_canonical(value)
    return {s: doc[s] for s in FSDP2_SECTIONS if s in doc}, problems
