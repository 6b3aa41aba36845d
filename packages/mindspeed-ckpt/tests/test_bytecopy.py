"""Byte pieces produce what slicing the same bytes in Python produces (copies, holes, gathers, interleaves)."""

import os

import pytest

from mindspeed_ckpt import bytecopy
from mindspeed_ckpt.bytecopy import Block, Copy, Gather, Inputs, Interleave, Zeros


@pytest.fixture
def inputs(tmp_path):
    data = [os.urandom(50_000), os.urandom(30_000)]
    paths = []
    for i, d in enumerate(data):
        (tmp_path / f"in{i}").write_bytes(d)
        paths.append(str(tmp_path / f"in{i}"))
    ins = Inputs(paths)
    yield ins, data
    ins.close()


def _run(tmp_path, ins, pieces):
    out = tmp_path / "out"
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    os.ftruncate(fd, 7 + bytecopy.size(pieces))
    n = bytecopy.write_pieces(ins, pieces, fd, 7)
    os.close(fd)
    assert n == bytecopy.size(pieces)
    return out.read_bytes()[7:]


def test_every_piece_kind(tmp_path, inputs):
    ins, (a, b) = inputs
    pieces = [Copy(0, 100, 5000), Zeros(300), Gather(1, 10, 2000, 12, 5), Copy(1, 0, 30_000),
              Interleave((0, 1), (1000, 20), 1500, 8), Gather(0, 0, 1, 50_000, 50_000)]
    want = (a[100:5100] + bytes(300) + b"".join(b[10 + r * 12:15 + r * 12] for r in range(2000)) + b
            + b"".join(a[1000 + r * 8:1008 + r * 8] + b[20 + r * 8:28 + r * 8] for r in range(1500)) + a)
    assert _run(tmp_path, ins, pieces) == want


def test_row_blocks():
    blocks = [Block(0, 0, 3), Block(None, 0, 2), Block(1, 40, 4)]
    assert bytecopy.row_slice(blocks, 2, 6, 10) == [Block(0, 20, 1), Block(None, 0, 2), Block(1, 40, 1)]
    assert bytecopy.as_pieces([Block(0, 0, 2), Block(0, 20, 1), Block(None, 0, 1)], 10) == [Copy(0, 0, 30), Zeros(10)]
    assert bytecopy.column_pieces([Block(1, 40, 4)], 10, 5, 5) == [Gather(1, 45, 4, 10, 5)]


def test_input_shorter_than_the_plan(tmp_path, inputs):
    ins, _ = inputs
    with pytest.raises(OSError, match="past the end"):
        _run(tmp_path, ins, [Gather(1, 0, 10, 5000, 10)])
    with pytest.raises(OSError, match="short"):
        _run(tmp_path, ins, [Copy(1, 29_000, 2000)])
