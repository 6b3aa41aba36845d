"""Parameter value types: checking structured values and parsing command-line text.

Types: bool, int, float, str, json (any YAML/JSON value), list[str], list[int], list[float].
``None`` is allowed for every type (a parameter left unset).
"""

from __future__ import annotations

import json
from typing import Any

TYPES = ("bool", "int", "float", "str", "json", "list[str]", "list[int]", "list[float]")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def element_type(type_: str) -> str | None:
    """'list[int]' -> 'int'; None for scalar types."""
    return type_[5:-1] if type_.startswith("list[") else None


def _scalar_ok(type_: str, v: Any) -> bool:
    if type_ == "bool":
        return isinstance(v, bool)
    if type_ == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if type_ == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if type_ == "str":
        return isinstance(v, str)
    return True  # json


def check_value(type_: str, value: Any) -> str | None:
    """None when ``value`` fits ``type_``; otherwise a short reason ('is 'x', expected int')."""
    if value is None:
        return None
    elem = element_type(type_)
    if elem:
        if not isinstance(value, list):
            return f"is {value!r}, expected a list of {elem}"
        bad = [v for v in value if not _scalar_ok(elem, v)]
        return f"has {bad[0]!r}, expected {elem} items" if bad else None
    return None if _scalar_ok(type_, value) else f"is {value!r}, expected {type_}"


def coerce(type_: str, value: Any) -> Any:
    """Normalise a structured (YAML/JSON) value: ints become floats for float params, a scalar
    becomes a one-item list for list params, numeric strings are parsed. Raises ValueError."""
    if value is None:
        return None
    elem = element_type(type_)
    if elem:
        items = value if isinstance(value, list) else [value]
        return [coerce(elem, v) for v in items]
    if isinstance(value, str) and type_ not in ("str", "json"):
        return parse_text(type_, value)
    if type_ == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type_ == "str" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    problem = check_value(type_, value)
    if problem:
        raise ValueError(problem)
    return value


def parse_text(type_: str, text: str) -> Any:
    """Parse one command-line token for a scalar type. Raises ValueError with a short reason."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if type_ == "bool":
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{text!r} is not true/false")
    if type_ == "int":
        try:
            return int(text, 0) if low.startswith(("0x", "0o", "0b")) else int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
    if type_ == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if type_ == "json":
        stripped = text.strip()
        if stripped[:1] in "{[\"" or stripped in ("true", "false"):
            try:
                return json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{text!r} is not valid JSON ({exc.msg} at column {exc.colno})") from None
        return text
    return text


def parse_tokens(type_: str, tokens: list[str]) -> Any:
    """Parse the tokens that follow a flag: one token for scalars, one or more for lists
    (a single comma-separated token is also split for list types)."""
    elem = element_type(type_)
    if elem is None:
        return parse_text(type_, tokens[0])
    if len(tokens) == 1 and tokens[0].strip().startswith("["):
        parsed = parse_text("json", tokens[0])
        return coerce(type_, parsed)
    if len(tokens) == 1 and "," in tokens[0]:
        tokens = [t for t in tokens[0].split(",") if t]
    if len(tokens) == 1 and tokens[0].lower() in ("none", "null"):
        return None
    return [parse_text(elem, t) for t in tokens]


def to_text(value: Any) -> str:
    """Render a canonical value as one command-line token (bool as true/false, JSON for dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return "None" if value is None else str(value)


def same(a: Any, b: Any) -> bool:
    """Value equality that treats 1 == 1.0 but not True == 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b
