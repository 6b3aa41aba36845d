"""An order-preserving map over worker processes, each holding its own tokenizer.

``ordered_map(fn, items, workers, make_state, init_args)`` yields ``fn(state, item)`` in input
order; ``state`` is built once per process by ``make_state(*init_args)``. With one worker
everything runs in this process (no pickling, easiest to debug). At most a few chunks per
worker are in flight, so memory stays bounded however large the input is (``Pool.imap``
would read the whole input ahead into its task queue).
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_STATE: dict[str, Any] = {}
IN_FLIGHT_PER_WORKER = 4


def _init(make_state: Callable[..., Any], init_args: tuple) -> None:
    _STATE["state"] = make_state(*init_args)


def _call_chunk(fn: Callable[[Any, Any], Any], chunk: list[Any]) -> list[Any]:
    return [fn(_STATE["state"], item) for item in chunk]


def ordered_map(
    fn: Callable[[Any, Any], Any],
    items: Iterable[Any],
    workers: int,
    make_state: Callable[..., Any],
    init_args: tuple = (),
    chunksize: int = 16,
) -> Iterator[Any]:
    """Yield ``fn(state, item)`` for every item, in input order, on ``workers`` processes.

    An exception raised while reading ``items`` or inside ``fn`` propagates to the caller at
    the position where it happened; the workers are then terminated.
    """
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    if workers == 1:
        state = make_state(*init_args)
        for item in items:
            yield fn(state, item)
        return
    # The Rust tokenizer's own thread pool does not survive fork; the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    source = iter(items)
    chunks = iter(lambda: list(itertools.islice(source, chunksize)), [])
    with ctx.Pool(workers, initializer=_init, initargs=(make_state, init_args)) as pool:
        pending: deque = deque()
        for chunk in itertools.chain(chunks, [None]):
            if chunk is not None:
                pending.append(pool.apply_async(_call_chunk, (fn, chunk)))
            while pending and (chunk is None or len(pending) >= workers * IN_FLIGHT_PER_WORKER):
                yield from pending.popleft().get()
