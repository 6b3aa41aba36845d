"""Process memory settings for conversions whose peak resident set must stay bounded.

glibc serves allocations below its mmap threshold from a heap that it rarely gives back to the
OS, and it raises that threshold (up to 32 MiB) each time a large block is freed. A
conversion allocates and frees tensors of a few MiB to a few hundred MiB one after another,
so with the default the heap keeps the high-water mark of whatever mix came before and the
resident set drifts well above the live tensors. :func:`bound_heap` fixes the threshold at
1 MiB (which also turns off the raising): every tensor-sized block is its own mapping, given
back when the tensor is freed. :func:`release_pages` drops the pages a memory-mapped input
tensor touched once it has been used.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

M_MMAP_THRESHOLD = -3  # <malloc.h>
THRESHOLD_BYTES = 1 << 20
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # <sys/mman.h> on Linux
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def bound_heap() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process (idempotent); False where the C
    library is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return bool(mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(THRESHOLD_BYTES)))


def release_pages(tensors: list[torch.Tensor]) -> None:
    """Drop the resident pages of tensors that view a privately mapped file and were never
    written: a rank file mapped by ``torch.load(mmap=True)``, a tensor of ``safe_open``.

    The kernel reads a dropped page again from the file if it is touched, so this trims the
    resident set (touched pages of a mapping otherwise stay counted until it is unmapped)
    without changing any value. Only whole pages inside each tensor are dropped. Linux only
    (no-op elsewhere). Never call it on other tensors: anonymous memory would read back as
    zeros, and a page written in place would lose the write.
    """
    if _LIBC is None:
        return
    for t in tensors:
        start = -(-t.data_ptr() // _PAGE) * _PAGE
        end = (t.data_ptr() + t.numel() * t.element_size()) // _PAGE * _PAGE
        if end > start:
            _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
