"""Torch-free byte plans and the in-kernel copy engine of the fast conversion path.

Every conversion without a dtype cast only moves bytes: an output tensor (a TP shard of a
megatron tensor, or an HF tensor cut out of merged shards) is a sequence of :data:`Piece`\\ s:

- :class:`Copy`: ``length`` contiguous bytes of an input file (a block of whole rows: a TP
  dim-0 split, the qkv per-group interleave, gate|up halves, a whole tensor);
- :class:`Zeros`: vocabulary padding (left as a hole of the pre-sized output file);
- :class:`Gather`: ``count`` runs of ``length`` bytes, ``stride`` apart (a dim-1 TP split or
  merge, one run per row).

:func:`write_pieces` executes them at an output offset: ``os.copy_file_range`` for copies (the
kernel copies page cache to page cache, as ``cp`` does; ``pread``/``pwrite`` through a reused
buffer where the file system refuses it), ``os.pwritev`` from a memory map of the input for gathers (one syscall per
1024 runs, no user-space copy), and drops the mapped pages afterwards so the resident set stays
small. All of these release the GIL, so output files written from threads proceed in parallel.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass

_IOV_MAX = 1024  # Linux's IOV_MAX: os.pwritev takes at most this many buffers
_CHUNK = 1 << 30  # copy_file_range length per call (it copies at most ~2 GiB at once)
_BUFFER = 8 << 20  # user-space copy buffer per thread


@dataclass(frozen=True)
class Copy:
    file: int  # index into the input file table
    offset: int
    length: int


@dataclass(frozen=True)
class Zeros:
    length: int


@dataclass(frozen=True)
class Gather:
    file: int
    offset: int  # first byte of the first run
    count: int
    stride: int  # bytes between run starts
    length: int  # bytes per run


@dataclass(frozen=True)
class Interleave:
    """``count`` rows, each the concatenation of one ``length``-byte run per input: run ``r`` of
    input ``i`` starts at ``offsets[i] + r * length`` (a dim-1 TP merge: each shard's rows are contiguous)."""

    files: tuple[int, ...]
    offsets: tuple[int, ...]
    count: int
    length: int


Piece = Copy | Zeros | Gather | Interleave


def size(pieces: list[Piece]) -> int:
    """Bytes the pieces produce."""
    total = 0
    for p in pieces:
        if isinstance(p, Gather):
            total += p.count * p.length
        elif isinstance(p, Interleave):
            total += p.count * p.length * len(p.files)
        else:
            total += p.length
    return total


@dataclass(frozen=True)
class Block:
    """``rows`` rows of ``row_bytes`` each, from ``file`` at ``offset`` (``file`` None: zero rows)."""

    file: int | None
    offset: int
    rows: int


def row_slice(blocks: list[Block], start: int, stop: int, row_bytes: int) -> list[Block]:
    """Rows ``[start, stop)`` of the row sequence the blocks make, as blocks."""
    out, pos = [], 0
    for b in blocks:
        lo, hi = max(start, pos), min(stop, pos + b.rows)
        if lo < hi:
            out.append(Block(b.file, b.offset + (lo - pos) * row_bytes, hi - lo))
        pos += b.rows
    return out


def as_pieces(blocks: list[Block], row_bytes: int) -> list[Piece]:
    """Blocks of whole rows as copies and zero runs (adjacent copies from one file merged)."""
    out: list[Piece] = []
    for b in blocks:
        n = b.rows * row_bytes
        if b.file is None:
            out.append(Zeros(n))
        elif out and isinstance(out[-1], Copy) and out[-1].file == b.file and out[-1].offset + out[-1].length == b.offset:
            out[-1] = Copy(b.file, out[-1].offset, out[-1].length + n)
        elif n:
            out.append(Copy(b.file, b.offset, n))
    return out


def column_pieces(blocks: list[Block], row_bytes: int, start: int, length: int) -> list[Piece]:
    """Bytes ``[start, start + length)`` of every row (a dim-1 slice) as gathers."""
    out: list[Piece] = []
    for b in blocks:
        if b.file is None:
            out.append(Zeros(b.rows * length))
        else:
            out.append(Gather(b.file, b.offset + start, b.rows, row_bytes, length))
    return out


class Inputs:
    """Input files opened once: read fds for copies, memory maps (opened on first gather) for gathers."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        self.fds: list[int] = []
        for p in self.paths:
            self.fds.append(os.open(p, os.O_RDONLY))
        self._maps: dict[int, mmap.mmap] = {}
        self._lock = threading.Lock()

    def view(self, i: int) -> memoryview:
        with self._lock:
            if i not in self._maps:
                self._maps[i] = mmap.mmap(self.fds[i], 0, prot=mmap.PROT_READ)
            return memoryview(self._maps[i])

    def drop(self, i: int, start: int, stop: int) -> None:
        """Unmap the resident pages of ``[start, stop)`` of input ``i`` (they stay in the page cache)."""
        m = self._maps.get(i)
        if m is not None and stop > start:
            lo = start - start % mmap.PAGESIZE
            m.madvise(mmap.MADV_DONTNEED, lo, stop - lo)

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        for fd in self.fds:
            os.close(fd)
        self.fds = []


_local = threading.local()


def _copy(src: int, dst: int, src_off: int, dst_off: int, n: int) -> None:
    # In the kernel, as cp does. pread + pwrite through a buffer looked ~25% cheaper for ranges at
    # different offsets within a page in a micro benchmark, but cost more CPU in whole conversions
    # (README), so it is only the fallback.
    in_kernel = True
    while n > 0:
        done = -1
        if in_kernel:
            try:
                done = os.copy_file_range(src, dst, min(n, _CHUNK), src_off, dst_off)
            except OSError:  # another file system, or a kernel without it
                in_kernel = False
        if not in_kernel:
            done = _copy_user(src, dst, src_off, dst_off, n)
        if done <= 0:
            raise OSError(f"copy stopped {n} bytes short (input shorter than its header says?)")
        src_off, dst_off, n = src_off + done, dst_off + done, n - done


def _copy_user(src: int, dst: int, src_off: int, dst_off: int, n: int) -> int:
    buf = getattr(_local, "buf", None)
    if buf is None:  # one buffer per thread, reused: no page faults on fresh memory
        buf = _local.buf = memoryview(bytearray(_BUFFER))
    got = os.preadv(src, [buf[:min(n, _BUFFER)]], src_off)
    done = 0
    while done < got:
        done += os.pwrite(dst, buf[done:got], dst_off + done)
    return got


def _writev(dst: int, bufs: list[memoryview], dst_off: int) -> int:
    n = os.pwritev(dst, bufs, dst_off)
    total = sum(len(b) for b in bufs)
    if n != total:  # a short write (rare on regular files): finish buffer by buffer
        pos = 0
        for b in bufs:
            if pos + len(b) > n:
                skip = max(n - pos, 0)
                os.pwrite(dst, b[skip:], dst_off + pos + skip)
            pos += len(b)
    for b in bufs:
        b.release()
    return total


def _views(inputs: Inputs, files: tuple[int, ...], ends: list[int]) -> list[memoryview]:
    views = [inputs.view(f) for f in files]
    for f, v, end in zip(files, views, ends, strict=True):
        if end > len(v):
            raise OSError(f"{inputs.paths[f]}: tensor bytes past the end of the file")
    return views


def _gather(inputs: Inputs, p: Gather, dst: int, dst_off: int) -> None:
    end = p.offset + (p.count - 1) * p.stride + p.length
    (view,) = _views(inputs, (p.file,), [end])
    for first in range(0, p.count, _IOV_MAX):
        starts = [p.offset + r * p.stride for r in range(first, min(p.count, first + _IOV_MAX))]
        dst_off += _writev(dst, [view[s:s + p.length] for s in starts], dst_off)
    view.release()
    inputs.drop(p.file, p.offset, end)


def _interleave(inputs: Inputs, p: Interleave, dst: int, dst_off: int) -> None:
    views = _views(inputs, p.files, [o + p.count * p.length for o in p.offsets])
    per = max(1, _IOV_MAX // len(p.files))
    for first in range(0, p.count, per):
        bufs = [v[o + r * p.length:o + (r + 1) * p.length] for r in range(first, min(p.count, first + per))
                for v, o in zip(views, p.offsets, strict=True)]
        dst_off += _writev(dst, bufs, dst_off)
    for f, v, o in zip(p.files, views, p.offsets, strict=True):
        v.release()
        inputs.drop(f, o, o + p.count * p.length)


def write_pieces(inputs: Inputs, pieces: list[Piece], dst: int, offset: int) -> int:
    """Produce ``pieces`` into file descriptor ``dst`` from ``offset`` on (the file is already
    sized: :class:`Zeros` are left as holes); returns the bytes produced."""
    pos = offset
    for p in pieces:
        if isinstance(p, Copy):
            _copy(inputs.fds[p.file], dst, p.offset, pos, p.length)
            pos += p.length
        elif isinstance(p, Gather):
            _gather(inputs, p, dst, pos)
            pos += p.count * p.length
        elif isinstance(p, Interleave):
            _interleave(inputs, p, dst, pos)
            pos += size([p])
        else:
            pos += p.length
    return pos - offset
