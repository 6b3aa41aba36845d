"""WriteBehind keeps order, bounds pending writes and re-raises errors."""

from __future__ import annotations

import threading

import pytest

from mindspeed_ckpt.pipeline import WriteBehind


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_writes_run_in_order(depth):
    out = []
    with WriteBehind(depth) as wb:
        for i in range(20):
            wb.submit(out.append, i)
    assert out == list(range(20))


def test_at_most_depth_writes_pending():
    gate = threading.Event()
    started = []
    wb = WriteBehind(1)
    wb.submit(lambda: (started.append(1), gate.wait(5)))
    done = threading.Event()

    def second():
        wb.submit(started.append, 2)  # waits for the first write (depth 1)
        done.set()

    t = threading.Thread(target=second)
    t.start()
    assert not done.wait(0.2)
    gate.set()
    t.join(5)
    wb.close()
    assert started == [1, 2]


def test_errors_surface():
    def boom():
        raise OSError("disk full")

    wb = WriteBehind(1)
    wb.submit(boom)
    with pytest.raises(OSError, match="disk full"):
        wb.close()
    with pytest.raises(ValueError, match="depth must be >= 0"):
        WriteBehind(-1)
