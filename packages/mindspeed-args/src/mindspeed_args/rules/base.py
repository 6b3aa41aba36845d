"""Rules as data: each names the parameters it reads, when it applies, what must hold, and how
to fix a violation. A rule that reads a parameter it did not declare is a bug and raises."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mindspeed_args.values import to_text

# Values computed from parameters (mindspeed_args.derive) that rules may read like parameters.
DERIVED = ("world_size", "data_parallel_size", "num_micro_batches", "ulysses_degree", "ring_degree")


class RuleReadError(RuntimeError):
    """A rule touched a parameter missing from its ``reads`` (programming error)."""


class View:
    """Read-only attribute access to the declared parameters only."""

    def __init__(self, values: Mapping[str, Any], reads: tuple[str, ...], rule_id: str):
        self._values, self._reads, self._rule = values, reads, rule_id

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._reads:
            raise RuleReadError(f"rule {self._rule} reads {name} without declaring it")
        return self._values.get(name)


@dataclass(frozen=True)
class Rule:
    """``applies`` and ``holds`` take a View; ``constraint``/``fix`` are str.format templates over
    the read values plus whatever ``extra`` returns (e.g. the multiple a size must have)."""

    id: str
    source: str
    reads: tuple[str, ...]
    applies: Callable[[View], bool]
    holds: Callable[[View], bool]
    constraint: str
    fix: str
    extra: Callable[[View], dict] | None = None
    blame: tuple[str, ...] = ()  # parameters to show; default: every read parameter

    def check(self, values: Mapping[str, Any]) -> Violation | None:
        view = View(values, self.reads, self.id)
        if not self.applies(view) or self.holds(view):
            return None
        fields = {n: values.get(n) for n in self.reads}
        fields.update(self.extra(view) if self.extra else {})
        shown = self.blame or self.reads
        return Violation(
            rule=self.id, source=self.source,
            params={n: values.get(n) for n in shown},
            constraint=self.constraint.format(**fields), fix=self.fix.format(**fields),
        )


@dataclass(frozen=True)
class Violation:
    rule: str
    source: str
    params: Mapping[str, Any]
    constraint: str
    fix: str

    def one_line(self) -> str:
        shown = ", ".join(f"{k}={to_text(v)}" for k, v in self.params.items())
        return f"[{self.rule}] {shown}: {self.constraint}; fix: {self.fix}"


def multiple_of(value: int | None, m: int | None) -> bool:
    """True when value is unset, m unusable, or value % m == 0."""
    return value is None or not m or value % m == 0


def round_up(value: int, m: int) -> int:
    return -(-value // m) * m if m else value
