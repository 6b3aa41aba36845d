"""Reading configuration files (YAML or JSON) with errors that name the file and line, and
reading canonical-name configs (flat, or grouped by the schema's groups)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from mindspeed_args.dialects import Parsed
from mindspeed_args.errors import UsageError
from mindspeed_args.groups import GROUPS_BY_NAME
from mindspeed_args.schema import FSDP2_SECTIONS, Schema
from mindspeed_args.values import coerce


def load_document(path: str) -> Any:
    """Parse a YAML/JSON file. A syntax error becomes 'FILE:LINE:COL: problem'."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise UsageError(f"{where}: YAML error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: YAML error: {exc}") from None


def looks_like_fsdp2(data: Any) -> bool:
    return isinstance(data, dict) and any(k in FSDP2_SECTIONS for k in data)


def parse_canonical(schema: Schema, data: Any, where: str) -> Parsed:
    """Read {name: value} or {group: {name: value}} keyed by canonical names."""
    out = Parsed()
    if data is None:
        return out
    if not isinstance(data, dict):
        out.problems.append(f"{where}: expected a mapping of parameter names to values")
        return out
    for key, value in data.items():
        key = str(key)
        if key in GROUPS_BY_NAME and isinstance(value, dict) and key not in schema:
            nested = parse_canonical(schema, value, f"{where} [{key}]")
            out.merge(nested)
            continue
        p = schema.params.get(key) or schema.find(key)
        if p is None:
            close = difflib.get_close_matches(key, list(schema.params), n=3)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            out.problems.append(f"{where}: unknown parameter {key!r}{hint}")
            continue
        try:
            out.set(p.name, coerce(p.type, value), where)
        except ValueError as exc:
            out.problems.append(f"{where}: {key} {exc}")
    return out
