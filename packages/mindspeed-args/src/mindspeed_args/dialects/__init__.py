"""Reading and writing launch parameters in each dialect.

Every reader returns canonical ``{name: value}`` for the parameters the input sets, plus a list
of one-line problems (all of them, not just the first). Writers take canonical values and
return the dialect's text, plus the parameters the dialect cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DIALECT_NAMES = ("megatron", "swift", "fsdp2")


@dataclass
class Parsed:
    """What a reader found: canonical values that were set, and problems (unusable input)."""

    values: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # name -> where it was set

    def set(self, name: str, value: Any, where: str) -> None:
        if name in self.values and where == self.sources.get(name):
            self.problems.append(f"{where} sets {name} twice")
        self.values[name] = value
        self.sources[name] = where

    def merge(self, other: Parsed) -> Parsed:
        """Values of ``other`` override ours (flags override a config file)."""
        self.values.update(other.values)
        self.sources.update(other.sources)
        self.problems.extend(other.problems)
        return self
