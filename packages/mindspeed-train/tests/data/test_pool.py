"""The order-preserving worker map: order, bounded read-ahead, errors."""

from __future__ import annotations

import pytest

from mindspeed_train.data.pool import IN_FLIGHT_PER_WORKER, ordered_map


def _state(offset):
    return offset


def _add(state, x):
    if x == -1:
        raise ValueError("bad item -1")
    return x + state


def test_order_matches_one_worker_and_read_ahead_is_bounded():
    consumed = []

    def items():
        for i in range(300):
            consumed.append(i)
            yield i

    it = ordered_map(_add, items(), 2, _state, (1000,), chunksize=4)
    assert next(it) == 1000
    assert len(consumed) <= (2 * IN_FLIGHT_PER_WORKER + 1) * 4  # not the whole input
    assert [1000, *it] == list(ordered_map(_add, range(300), 1, _state, (1000,)))


def test_errors_propagate():
    with pytest.raises(ValueError, match="bad item -1"):
        list(ordered_map(_add, [1, 2, -1, 3], 2, _state, (0,), chunksize=1))
    with pytest.raises(ValueError, match="workers=0"):
        list(ordered_map(_add, [1], 0, _state, (0,)))
