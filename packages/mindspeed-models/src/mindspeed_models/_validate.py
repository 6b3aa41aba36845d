"""Value checks shared by the config mapping modules (one-line ValueErrors naming the config.json key)."""

from __future__ import annotations

import math

__all__ = ["positive_int", "finite_number"]


def positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.json: {name}={value!r} must be a positive integer")


def finite_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"config.json: {name}={value!r} must be a finite number >= 0")
