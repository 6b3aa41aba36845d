"""'Did you mean' hints for unknown flags and keys."""

from __future__ import annotations

import difflib

from mindspeed_args.schema import Schema


def unknown(schema: Schema, dialect: str, spelling: str, what: str = "flag") -> str:
    """One line: the unknown spelling, the closest spellings of this dialect, and a note when the
    spelling belongs to another dialect (e.g. '--seq_length' is how swift writes it)."""
    known = [sp.name for p in schema.in_dialect(dialect) for sp in [p.spellings[dialect]]]
    line = f"unknown {dialect} {what} {spelling!r}"
    other = _other_dialect(schema, dialect, spelling)
    if other:
        line += f"; {other}"
    close = difflib.get_close_matches(spelling, known, n=3, cutoff=0.6)
    if not close:
        bare = spelling.lstrip("-").replace("-", "_")
        close = difflib.get_close_matches(bare, [k.lstrip("-").replace("-", "_") for k in known], n=3, cutoff=0.6)
        close = [k for k in known if k.lstrip("-").replace("-", "_") in close]
    if close:
        line += "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    return line


def _other_dialect(schema: Schema, dialect: str, spelling: str) -> str | None:
    p = schema.find(spelling)
    if p is None or dialect not in p.spellings:
        if p is not None and dialect != "env":
            where = ", ".join(f"{d} {sp.display!r}" for d, sp in p.spellings.items())
            return f"{p.name} is not a {dialect} parameter (it is {where})"
        return None
    return f"the {dialect} spelling of {p.name} is {p.spellings[dialect].display!r}"
