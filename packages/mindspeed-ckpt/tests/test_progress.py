"""The stderr progress line: counts, sizes, rate and ETA from an injected clock; silent unless asked or a tty."""

import io

from mindspeed_ckpt.progress import Progress


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_line_reports_counts_rate_and_eta():
    clock, out = _Clock(), io.StringIO()
    p = Progress("hf-to-mcore", 4, 4 * 2**20, enabled=True, stream=out, interval_s=1.0, clock=clock)
    clock.now = 2.0
    p.update(2**20)
    assert p.line() == "hf-to-mcore: 1/4 tensors, 1.0 MiB/4.0 MiB, 512.0 KiB/s, ETA 0:00:06"
    clock.now = 2.5
    p.update(2**20)  # within interval_s of the last draw: not redrawn
    assert out.getvalue().count("\r") == 1
    clock.now = 4.0
    p.update(2 * 2**20, tensors=2)
    p.close()
    assert out.getvalue().endswith("\rhf-to-mcore: 4/4 tensors, 4.0 MiB/4.0 MiB, 1.0 MiB/s, ETA 0:00:00\n")


def test_enabled_only_on_a_tty_by_default():
    quiet, loud = io.StringIO(), _Tty()
    for stream in (quiet, loud):
        p = Progress("x", 1, 10, stream=stream)
        p.update(10)
        p.close()
    assert quiet.getvalue() == ""
    assert loud.getvalue().startswith("\rx: 1/1 tensors, 10 B/10 B, ") and loud.getvalue().endswith(", ETA 0:00:00\n")
    assert not Progress("x", 1, 1, stream=_Tty(), enabled=False).enabled
