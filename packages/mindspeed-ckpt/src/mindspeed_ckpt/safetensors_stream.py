"""Reading and writing safetensors files one tensor at a time, without memory maps.

Format: 8 bytes little-endian header length ``N``, ``N`` bytes of JSON (``{name: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets relative to the data
that follows, padded with spaces), then the tensors' bytes back to back.

:class:`SafetensorsFile` reads one tensor with ``pread`` into a fresh tensor: unlike a memory
map (``safe_open``), whose touched pages stay in the process's resident set until the file
is closed, memory holds only the tensors the caller keeps. :class:`SafetensorsWriter` writes
the header first (offsets follow from dtypes and shapes known up front) and then each
tensor's bytes at its offset, so no more than one tensor is in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from mindspeed_ckpt.plan import PAGE_ALIGNMENT

# safetensors dtype names <-> torch dtypes (the float8 ones only where this torch has them)
_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
          "U16": "uint16", "U32": "uint32", "U64": "uint64"}
DTYPES: Mapping[str, torch.dtype] = {k: getattr(torch, v) for k, v in _NAMES.items() if hasattr(torch, v)}
NAMES: Mapping[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024**2  # safetensors' own limit


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _byte_view(t: torch.Tensor) -> memoryview:
    """A writable/readable view of contiguous ``t``'s bytes (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class SafetensorsFile:
    """One safetensors file opened for reading by ``pread``.

    ``keys()`` lists tensor names in file order; ``get(name)`` returns a fresh contiguous
    tensor (KeyError when absent); ``metadata`` is the ``__metadata__`` dict. ValueError
    (naming the file) for a corrupt header.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._fd = -1
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._entries, self.metadata, self._data_start = self._parse(os.fstat(self._fd).st_size)
        except BaseException:
            self.close()
            raise

    def _parse(self, size: int) -> tuple[dict[str, tuple[torch.dtype, tuple[int, ...], int, int]], dict, int]:
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise ValueError(f"{self.path}: not a safetensors file (header length {n} does not fit the file of {size} bytes)")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.path}: not a safetensors file (header is not JSON: {exc})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        entries = {}
        for name, e in header.items():
            entries[name] = self._entry(name, e, size - 8 - n)
        return dict(sorted(entries.items(), key=lambda kv: kv[1][2])), meta, 8 + n

    def _entry(self, name: str, e: Any, data_size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        try:
            dtype, shape, (begin, end) = DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{self.path}: tensor {name!r} has a malformed header entry {e!r}") from None
        if not (0 <= begin <= end <= data_size) or end - begin != _numel(shape) * dtype.itemsize:
            raise ValueError(f"{self.path}: tensor {name!r} has data_offsets {[begin, end]} that do not match its "
                             f"shape {list(shape)} / {e['dtype']} or the file size (truncated file?)")
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of a tensor, without reading it."""
        dtype, shape, _, _ = self._entries[name]
        return dtype, shape

    def get(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` into a new tensor."""
        dtype, shape, begin, end = self._entries[name]
        out = torch.empty(shape, dtype=dtype)
        if end > begin:
            self._read_into(_byte_view(out), self._data_start + begin)
        return out

    def _read_into(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            got = os.preadv(self._fd, [buf[done:]], offset + done)
            if got == 0:
                raise ValueError(f"{self.path}: file ends early (truncated?)")
            done += got

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class SafetensorsWriter:
    """Writes one safetensors file whose tensors are declared up front.

    specs: (name, dtype, shape) per tensor, in file order. The header is written at once;
    then :meth:`write` each tensor (any order, each exactly once, matching its spec; a
    non-contiguous tensor is copied first) and :meth:`close`. ValueError for a tensor that
    is unknown, written twice, of the wrong dtype/shape, or missing at close.
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = os.fspath(path)
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        self._slots: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        pos = 0
        for name, dtype, shape in specs:
            if name in self._slots or name == "__metadata__":
                raise ValueError(f"{self.path}: tensor name {name!r} declared twice (or reserved)")
            if dtype not in NAMES:
                raise ValueError(f"{self.path}: tensor {name!r} has dtype {dtype}, which safetensors cannot store")
            shape = tuple(int(s) for s in shape)
            n = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
            self._slots[name] = (dtype, shape, pos)
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % PAGE_ALIGNMENT)  # page-aligned data (safetensors' own writer: 8 bytes)
        self._data_start = 8 + len(raw)
        self.nbytes = self._data_start + pos
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self.nbytes)  # tensors may arrive in any order: no holes left at close
        self._write_at(memoryview(struct.pack("<Q", len(raw)) + raw), 0)
        self._pending = set(self._slots)

    @property
    def done(self) -> bool:
        """Every declared tensor has been written."""
        return not self._pending

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the bytes of declared tensor ``name``."""
        if name not in self._slots:
            raise ValueError(f"{self.path}: tensor {name!r} was not declared")
        if name not in self._pending:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        dtype, shape, pos = self._slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, "
                             f"declared {dtype} {list(shape)}")
        if tensor.numel():
            self._write_at(_byte_view(tensor.detach().cpu().contiguous()), self._data_start + pos)
        self._pending.discard(name)

    def _write_at(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            done += os.pwrite(self._fd, buf[done:], offset + done)

    def close(self) -> None:
        """Finish the file; ValueError naming the first declared tensor never written."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        if self._pending:
            missing = sorted(self._pending)
            raise ValueError(f"{self.path}: tensor {missing[0]!r} declared but never written ({len(missing)} in all)")

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
