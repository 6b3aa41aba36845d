"""The rule table: every cross-parameter rule, in report order. Value rules (choices, ranges,
required keys) come from the schema itself (see mindspeed_args.validate)."""

from __future__ import annotations

from mindspeed_args.rules import context_parallel, data, features, parallel, recompute, rl
from mindspeed_args.rules.base import DERIVED, Rule, Violation

RULES: tuple[Rule, ...] = (
    *parallel.RULES,
    *context_parallel.RULES,
    *recompute.RULES,
    *features.RULES,
    *data.RULES,
    *rl.RULES,
)

__all__ = ["DERIVED", "RULES", "Rule", "Violation"]
