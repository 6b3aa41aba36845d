"""Environment variables the guides document (seed 002), read from a mapping such as os.environ."""

from __future__ import annotations

from collections.abc import Mapping

from mindspeed_args.dialects import Parsed
from mindspeed_args.schema import Schema
from mindspeed_args.values import parse_text

DIALECT = "env"


def parse(schema: Schema, environ: Mapping[str, str]) -> Parsed:
    out = Parsed()
    for p in schema.in_dialect(DIALECT):
        var = p.spellings[DIALECT].name
        if var not in environ:
            continue
        try:
            out.set(p.name, parse_text(p.type, environ[var]), f"environment {var}")
        except ValueError as exc:
            out.problems.append(f"environment variable {var}: {exc}")
    return out
