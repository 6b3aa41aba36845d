"""Progress reporting: a tqdm bar on a terminal, a plain line every ``log_interval`` items otherwise."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any


@contextmanager
def progress(desc: str, log_interval: int, unit: str = "doc") -> Any:
    """Yield an object with ``update(n)``; the bar closes (or a final line prints) on exit."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency; keep working without it anyway
        tqdm = None
    if tqdm is not None and sys.stderr.isatty():
        bar = tqdm(desc=desc, unit=unit, miniters=log_interval, mininterval=0.5, file=sys.stderr)
        try:
            yield bar
        finally:
            bar.close()
        return
    lines = _LogLines(desc, log_interval, unit)
    yield lines
    lines.finish()


class _LogLines:
    """Logs like ``preprocess: 2000 docs (812.3 docs/s)`` to stderr: CI logs get no bar redraws."""

    def __init__(self, desc: str, log_interval: int, unit: str) -> None:
        self.desc, self.every, self.unit = desc, max(1, log_interval), unit
        self.count, self.start = 0, time.perf_counter()

    def update(self, n: int = 1) -> None:
        before, self.count = self.count, self.count + n
        if self.count // self.every > before // self.every:
            self._line()

    def finish(self) -> None:
        if self.count % self.every:
            self._line()

    def _line(self) -> None:
        rate = self.count / max(time.perf_counter() - self.start, 1e-9)
        print(f"{self.desc}: {self.count} {self.unit}s ({rate:.1f} {self.unit}s/s)", file=sys.stderr, flush=True)
