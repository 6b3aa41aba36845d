"""The swift dialect: ms-swift Megatron-SWIFT ('megatron sft --key value').

Keys are snake_case; booleans take 'true'/'false' (a bare '--flag' means true); lists take one
or more tokens. Parameters ms-swift does not name itself go to Megatron through
'--megatron_extra_kwargs' as a JSON object of canonical names, exactly as ms-swift users do.
"""

from __future__ import annotations

import json
from typing import Any

from mindspeed_args.dialects import Parsed
from mindspeed_args.dialects.flags import split_flags
from mindspeed_args.schema import Schema
from mindspeed_args.suggest import unknown
from mindspeed_args.values import coerce, element_type, parse_tokens, same, to_text

DIALECT = "swift"
EXTRA = "megatron_extra_kwargs"


def parse(schema: Schema, argv: list[str], where: str = "command line") -> Parsed:
    out = Parsed()
    uses, out.problems = split_flags(argv)
    for use in uses:
        key = use.flag[2:]
        if key == EXTRA:
            _parse_extra(schema, use.tokens, out, where)
            continue
        p = schema.by_spelling(DIALECT, key)
        if p is None:
            out.problems.append(unknown(schema, DIALECT, key, "key"))
            continue
        try:
            if p.type == "bool" and not use.tokens:
                value: Any = True
            elif not use.tokens:
                raise ValueError("needs a value")
            elif element_type(p.type) is None and len(use.tokens) > 1:
                raise ValueError(f"takes one value, got {len(use.tokens)}: {' '.join(use.tokens)!r}")
            else:
                value = parse_tokens(p.type, use.tokens)
        except ValueError as exc:
            out.problems.append(f"--{key}: {exc}")
            continue
        out.set(p.name, p.spellings[DIALECT].to_canonical(value), where)
    return out


def _parse_extra(schema: Schema, tokens: list[str], out: Parsed, where: str) -> None:
    try:
        extra = json.loads(" ".join(tokens))
        if not isinstance(extra, dict):
            raise ValueError("is not a JSON object")
    except ValueError as exc:
        out.problems.append(f"--{EXTRA}: {exc}")
        return
    for key, raw in extra.items():
        p = schema.params.get(key)
        if p is None or "megatron" not in p.spellings:
            out.problems.append(f"--{EXTRA}: " + unknown(schema, "megatron", "--" + key.replace("_", "-")))
            continue
        try:
            out.set(p.name, coerce(p.type, raw), f"{where} ({EXTRA})")
        except ValueError as exc:
            out.problems.append(f"--{EXTRA}: {key} {exc}")


def render(schema: Schema, values: dict[str, Any]) -> tuple[list[str], list[str]]:
    """argv for values that differ from ms-swift's defaults; Megatron-only parameters are
    gathered into one --megatron_extra_kwargs JSON object."""
    argv: list[str] = []
    extra: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in values.items():
        p = schema[name]
        if same(value, p.default_for(DIALECT)):
            continue
        sp = p.spellings.get(DIALECT)
        if sp is None:
            if "megatron" in p.spellings:
                extra[name] = value
            else:
                problems.append(f"{name}={to_text(value)} has no swift key and is not a megatron parameter")
            continue
        value = sp.from_canonical(value)
        if isinstance(value, list) and element_type(p.type):
            argv.extend(["--" + sp.name, *(to_text(v) for v in value)] if value else ["--" + sp.name, "[]"])
        else:
            argv.extend(["--" + sp.name, to_text(value)])
    if extra:
        argv.extend(["--" + EXTRA, json.dumps(extra, ensure_ascii=False, separators=(",", ":"))])
    return argv, problems
