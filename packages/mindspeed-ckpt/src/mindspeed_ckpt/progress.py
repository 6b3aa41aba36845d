"""A one-line progress report on stderr: tensors and bytes done, rate, ETA (no dependencies).

Shown when asked for (``--progress``) or, by default, when stderr is a terminal. The line is
redrawn in place (carriage return) at most every ``interval_s`` seconds, and finished with a
newline by :meth:`Progress.close`.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _clock(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Counts tensors and bytes against known totals and prints ``label: 12/340 tensors,
    1.2 GiB/9.8 GiB, 210.0 MiB/s, ETA 0:00:41`` on ``stream``.

    enabled: None = only when ``stream`` is a terminal. ``clock`` is injectable for tests.
    """

    def __init__(self, label: str, total_tensors: int, total_bytes: int, *, enabled: bool | None = None,
                 stream: TextIO | None = None, interval_s: float = 0.5, clock=time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) if enabled is None else enabled
        self.label, self.total_tensors, self.total_bytes = label, total_tensors, max(total_bytes, 1)
        self.tensors = self.bytes = 0
        self.interval_s, self.clock = interval_s, clock
        self.start = self.clock()
        self._last_draw: float | None = None

    def line(self) -> str:
        """The current report (without the carriage return)."""
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.bytes / elapsed
        left = max(self.total_bytes - self.bytes, 0)
        eta = _clock(left / rate) if rate > 0 else "?"
        return (f"{self.label}: {self.tensors}/{self.total_tensors} tensors, {_size(self.bytes)}/{_size(self.total_bytes)}, "
                f"{_size(rate)}/s, ETA {eta}")

    def update(self, nbytes: int, tensors: int = 1) -> None:
        """Record ``tensors`` more tensors of ``nbytes`` bytes in all; redraw when due."""
        self.tensors += tensors
        self.bytes += nbytes
        now = self.clock()
        if self.enabled and (self._last_draw is None or now - self._last_draw >= self.interval_s):
            self._last_draw = now
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def close(self) -> None:
        """Draw the final line and end it."""
        if self.enabled:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()
