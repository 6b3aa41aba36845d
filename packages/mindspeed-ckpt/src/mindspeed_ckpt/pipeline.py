"""Write-behind: file writes on a background thread while the caller prepares the next tensor.

``torch._C.PyTorchFileWriter.write_record`` and ``os.pwrite`` release the GIL, so with two
cores a conversion can read and transform tensor ``n + 1`` while tensor ``n`` is written.
At most ``depth`` writes are pending, which bounds the extra memory to ``depth`` tensors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class WriteBehind:
    """Runs ``submit(fn, *args)`` calls in order on one background thread, at most ``depth``
    pending (``submit`` waits for the oldest first). An error from a write is raised by the next
    :meth:`submit` or by :meth:`drain`/:meth:`close`. ``depth=0`` runs each write at once."""

    def __init__(self, depth: int = 1):
        if depth < 0:
            raise ValueError(f"WriteBehind depth must be >= 0; got {depth}")
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-write") if depth else None
        self._pending: deque[Future] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._pool is None:
            fn(*args)
            return
        while len(self._pending) >= self.depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        """Wait for every pending write (raising the first error)."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        for f in self._pending:
            f.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
