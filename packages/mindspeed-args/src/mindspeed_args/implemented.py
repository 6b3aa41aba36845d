"""Which package implements which parameters today (an explicit table, updated as features land).

A parameter missing here is accepted only at its default; set to anything else, validation
reports it as not implemented yet, naming the package that will own it.
"""

from __future__ import annotations

IMPLEMENTED_BY: dict[str, frozenset[str]] = {
    # Issue #2 lands the schema and validator only: no training feature is implemented yet.
}


def implementer(name: str) -> str | None:
    """The distribution that implements ``name``, or None."""
    return next((dist for dist, names in IMPLEMENTED_BY.items() if name in names), None)
