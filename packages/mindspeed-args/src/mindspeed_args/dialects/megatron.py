"""The megatron dialect: MindSpeed-LLM / MindSpeed-MM launch flags ('--kebab-case').

Booleans are switches: '--use-flash-attn' sets True; a boolean whose default is True is turned
off with '--no-<flag>' (unless that spelling is a parameter of its own). Lists take one or more
tokens ('--lora-target-modules linear_qkv linear_proj'); JSON parameters take one JSON token.
"""

from __future__ import annotations

from typing import Any

from mindspeed_args.dialects import Parsed
from mindspeed_args.dialects.flags import split_flags
from mindspeed_args.schema import Param, Schema
from mindspeed_args.suggest import unknown
from mindspeed_args.values import element_type, parse_tokens, same, to_text

DIALECT = "megatron"


def lookup(schema: Schema, flag: str) -> tuple[Param | None, bool]:
    """(param, negated) for a flag; '--no-x' negates boolean '--x' when not a flag itself."""
    p = schema.by_spelling(DIALECT, flag)
    if p is None and flag.startswith("--no-"):
        base = schema.by_spelling(DIALECT, "--" + flag[5:])
        if base is not None and base.type == "bool":
            return base, True
    return p, False


def parse(schema: Schema, argv: list[str], where: str = "command line") -> Parsed:
    out = Parsed()
    uses, out.problems = split_flags(argv)
    for use in uses:
        p, negated = lookup(schema, use.flag)
        if p is None:
            out.problems.append(unknown(schema, DIALECT, use.flag))
            continue
        sp = p.spellings[DIALECT]
        try:
            value = _value(p, use.tokens, negated, use.inline)
        except ValueError as exc:
            out.problems.append(f"{use.flag}: {exc}")
            continue
        out.set(p.name, sp.to_canonical(value), where)
    return out


def _value(p: Param, tokens: list[str], negated: bool, inline: bool) -> Any:
    if p.type == "bool":
        if inline:  # --flag=true is accepted for convenience
            value = parse_tokens("bool", tokens)
            return (not value) if negated else value
        if tokens:
            raise ValueError(f"is a switch and takes no value (got {' '.join(tokens)!r})")
        return not negated
    if not tokens:
        raise ValueError("needs a value")
    if element_type(p.type) is None and len(tokens) > 1:
        raise ValueError(f"takes one value, got {len(tokens)}: {' '.join(tokens)!r}")
    return parse_tokens(p.type, tokens)


def render(schema: Schema, values: dict[str, Any]) -> tuple[list[str], list[str]]:
    """argv for the values that differ from megatron defaults; and problems for values the
    megatron dialect cannot express (parameters it lacks, or None where its default is set)."""
    argv: list[str] = []
    problems: list[str] = []
    for name, value in values.items():
        p = schema[name]
        sp = p.spellings.get(DIALECT)
        if sp is None:
            problems.append(f"{name}={to_text(value)} has no megatron flag")
            continue
        if same(value, sp.default):
            continue
        value = sp.from_canonical(value)
        if p.type == "bool":
            if value is None:
                problems.append(f"{name}=None cannot be written as a megatron switch")
            elif value:
                argv.append(sp.name)
            elif lookup(schema, "--no-" + sp.name[2:]) == (p, True):
                argv.append("--no-" + sp.name[2:])
            else:
                problems.append(f"{name}=false cannot be written: {sp.name} is a switch that defaults to true")
        elif value is None:
            problems.append(f"{name}=None cannot be written: megatron's default is {to_text(sp.default)}")
        elif isinstance(value, list) and element_type(p.type):
            argv.extend([sp.name, *(to_text(v) for v in value)] if value else [])
            if not value:
                problems.append(f"{name}=[] cannot be written as megatron flags")
        else:
            argv.extend([sp.name, to_text(value)])
    return argv, problems
