"""The ``torch.save`` file format without torch: laying out and parsing its zip container and pickle.

A ``torch.save`` file is a zip archive of *stored* (uncompressed) records under one folder
``<archive>/``: ``data/<key>`` (a storage's raw bytes, each aligned to 64 bytes so
``torch.load(mmap=True)`` can map it), ``data.pkl`` (the pickled object, in which tensors are
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`` and
storages are persistent ids ``("storage", torch.<Type>Storage, key, "cpu", numel)``), and the
small records ``.format_version``, ``.storage_alignment``, ``byteorder``, ``version`` and
``.data/serialization_id``. :func:`layout` places every record of a file whose storage sizes
are known in advance (as torch's ``PyTorchFileWriter`` does with CRC-32 off: local header
with a data descriptor, an ``FB`` extra field padding the data to 64 bytes, zip64 end
records), so the converter can copy each storage's bytes straight into its place.
:func:`dumps` writes protocol-2 pickles of plain data plus the few torch references the
format needs (:class:`Global`, :class:`TensorRecord`, :class:`Namespace`), and
:func:`read_index` lists a file's tensors (record offset, dtype, shape, stride) with a
restricted unpickler, never importing torch.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Any

ALIGNMENT = 64
# safetensors dtype name -> (torch dtype name, legacy storage class, itemsize)
DTYPES = {"F64": ("float64", "DoubleStorage", 8), "F32": ("float32", "FloatStorage", 4), "F16": ("float16", "HalfStorage", 2),
          "BF16": ("bfloat16", "BFloat16Storage", 2), "I64": ("int64", "LongStorage", 8), "I32": ("int32", "IntStorage", 4),
          "I16": ("int16", "ShortStorage", 2), "I8": ("int8", "CharStorage", 1), "U8": ("uint8", "ByteStorage", 1),
          "BOOL": ("bool", "BoolStorage", 1)}
_BY_STORAGE = {storage: st for st, (_, storage, _) in DTYPES.items()}
_BY_TORCH = {name: st for st, (name, _, _) in DTYPES.items()}
_LOCAL = struct.Struct("<IHHHHHIIIHH")
_DESCRIPTOR = struct.Struct("<IIII")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
ZIP32_LIMIT = 0xFFFFFFFF  # past this a record needs zip64 extra fields, which layout() does not write


class NotFast(Exception):
    """A conversion the torch-free fast path does not handle (a dtype cast, an unknown dtype, a torch
    file needing zip64 records, ...): the caller falls back to the torch path. Not a ValueError, so
    it is never reported as bad input."""


@dataclass(frozen=True)
class Global:
    """A module-level object referenced by name in a pickle (``torch.bfloat16``, ...)."""

    module: str
    name: str

    def __str__(self) -> str:  # mcore_args.dtype_name() reads dtypes as "torch.<name>"
        return f"{self.module}.{self.name}"


def torch_dtype(st_dtype: str) -> Global:
    """The ``torch.<dtype>`` reference for a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``)."""
    return Global("torch", DTYPES[st_dtype][0])


@dataclass(frozen=True)
class TensorRecord:
    """A contiguous tensor stored whole in record ``data/<key>``: safetensors dtype name, shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class Namespace:
    """An ``argparse.Namespace`` to pickle (megatron's saved ``args``)."""

    fields: dict[str, Any] = field(default_factory=dict)


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of safetensors dtype name ``dtype`` and ``shape``."""
    n = DTYPES[dtype][2]
    for s in shape:
        n *= s
    return n


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides (elements) of ``shape``, as torch gives a contiguous tensor."""
    out, step = [], 1
    for s in reversed(shape):
        out.append(step)
        step *= max(s, 1)
    return tuple(reversed(out))


class _Emitter:
    """Protocol-2 pickle opcodes for dict/list/tuple/str/int/float/bool/None and the classes above."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")

    def op(self, code: bytes, payload: bytes = b"") -> None:
        self.out += code + payload

    def save(self, obj: Any) -> None:
        if obj is None or isinstance(obj, bool):
            self.op({None: b"N", True: b"\x88", False: b"\x89"}[obj])
        elif isinstance(obj, int):
            self._int(obj)
        elif isinstance(obj, float):
            self.op(b"G", struct.pack(">d", obj))
        elif isinstance(obj, str):
            raw = obj.encode("utf-8")
            self.op(b"X", struct.pack("<I", len(raw)) + raw)
        elif isinstance(obj, tuple):
            self._tuple(obj)
        elif isinstance(obj, list):
            self.op(b"]")
            self._batch(obj, b"e", lambda x: self.save(x))
        elif isinstance(obj, dict):
            self.op(b"}")
            self._batch(list(obj.items()), b"u", lambda kv: (self.save(kv[0]), self.save(kv[1])))
        elif isinstance(obj, Global):
            self.op(b"c", f"{obj.module}\n{obj.name}\n".encode())
        elif isinstance(obj, TensorRecord):
            self._tensor(obj)
        elif isinstance(obj, Namespace):  # copyreg.__newobj__ + state, as pickle itself writes it
            self.save(Global("argparse", "Namespace"))
            self.op(b")\x81")
            self.save(obj.fields)
            self.op(b"b")
        else:
            raise TypeError(f"torchfile.dumps: cannot pickle {type(obj).__name__}")

    def _int(self, v: int) -> None:
        if 0 <= v < 256:
            self.op(b"K", bytes([v]))
        elif -(2**31) <= v < 2**31:
            self.op(b"J", struct.pack("<i", v))
        else:
            raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.op(b"\x8a", bytes([len(raw)]) + raw)

    def _tuple(self, items: tuple) -> None:
        if not items:
            self.op(b")")
            return
        if len(items) > 3:
            self.op(b"(")
        for x in items:
            self.save(x)
        self.op(b"t" if len(items) > 3 else {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(items)])

    def _batch(self, items: list, end: bytes, put) -> None:
        for i in range(0, len(items), 1000):  # pickle's own batch size
            self.op(b"(")
            for x in items[i:i + 1000]:
                put(x)
            self.op(end)

    def _tensor(self, t: TensorRecord) -> None:
        self.save(Global("torch._utils", "_rebuild_tensor_v2"))
        self.op(b"(")
        numel = t.nbytes // DTYPES[t.dtype][2]
        self.save(("storage", Global("torch", DTYPES[t.dtype][1]), t.key, "cpu", numel))
        self.op(b"Q")  # BINPERSID: the tuple above is the storage's persistent id
        for x in (0, tuple(t.shape), contiguous_strides(tuple(t.shape)), False):
            self.save(x)
        self.save(Global("collections", "OrderedDict"))
        self.op(b")R")
        self.op(b"tR")


def dumps(obj: Any) -> bytes:
    """A protocol-2 pickle of ``obj`` (plain data, :class:`Global`, :class:`TensorRecord`, :class:`Namespace`)."""
    e = _Emitter()
    e.save(obj)
    e.op(b".")
    return bytes(e.out)


@dataclass(frozen=True)
class Record:
    """One zip record of a file laid out by :func:`layout`: name (inside the archive folder),
    offset of its local header, offset of its data, size."""

    name: str
    header: int
    data: int
    size: int


def _padding(offset: int, name_len: int, alignment: int) -> int:
    start = offset + _LOCAL.size + name_len + 4  # header, name, the FB extra field's own 4 bytes
    return (-start) % alignment


def _descriptor_size(size: int) -> int:
    return _DESCRIPTOR.size if size else 0  # torch's writer (miniz) adds no data descriptor to an empty record


def _flags(size: int) -> int:
    return 0x0808 if size else 0x0800  # UTF-8 names; bit 3: sizes in the data descriptor


def layout(archive: str, records: list[tuple[str, int]], alignment: int = ALIGNMENT) -> tuple[list[Record], int]:
    """Place ``records`` ((name, size), in file order) as torch's zip writer does with storage
    alignment ``alignment`` (torch's default 64; :func:`small_records` must record the same); returns the
    records and the file size. :class:`NotFast` when the file would need zip64 record fields."""
    out, pos = [], 0
    for name, size in records:
        full = f"{archive}/{name}".encode()
        data = pos + _LOCAL.size + len(full) + 4 + _padding(pos, len(full), alignment)
        out.append(Record(name, pos, data, size))
        pos = data + size + _descriptor_size(size)
    if pos > ZIP32_LIMIT:
        raise NotFast(f"torch file of {pos} bytes needs zip64 records")
    central = sum(_CENTRAL.size + len(f"{archive}/{r.name}") for r in out)
    return out, pos + central + 56 + 20 + 22


def headers(archive: str, records: list[Record]) -> list[tuple[int, bytes]]:
    """(offset, bytes) of every local header and data descriptor plus the central directory and
    end records: with the data written at each ``Record.data`` they make the whole file. CRC-32
    fields are 0, as torch writes them with CRC off (``torch.load`` does not check them)."""
    pieces, central = [], bytearray()
    for r in records:
        name = f"{archive}/{r.name}".encode()
        pad = r.data - (r.header + _LOCAL.size + len(name) + 4)
        local = _LOCAL.pack(0x04034B50, 0, _flags(r.size), 0, 0, 0, 0, 0, 0, len(name), 4 + pad)
        pieces.append((r.header, local + name + b"FB" + struct.pack("<H", pad) + b"Z" * pad))
        if r.size:
            pieces.append((r.data + r.size, _DESCRIPTOR.pack(0x08074B50, 0, r.size, r.size)))
        central += _CENTRAL.pack(0x02014B50, 0, 0, _flags(r.size), 0, 0, 0, 0, r.size, r.size, len(name), 0, 0, 0, 0, 0, r.header)
        central += name
    cd_start = records[-1].data + records[-1].size + _descriptor_size(records[-1].size)
    n, z64 = len(records), cd_start + len(central)
    end = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x2D, 0, 0, n, n, len(central), cd_start)
    end += struct.pack("<IIQI", 0x07064B50, 0, z64, 1)
    end += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(central), cd_start, 0)
    pieces.append((cd_start, bytes(central) + end))
    return pieces


def small_records(pickle_bytes: bytes, alignment: int = ALIGNMENT) -> list[tuple[str, bytes]]:
    """The records after the storages, in torch's order, with their contents."""
    return [("data.pkl", pickle_bytes), (".format_version", b"1"), (".storage_alignment", str(alignment).encode()),
            ("byteorder", sys.byteorder.encode()), ("version", b"3\n"),
            (".data/serialization_id", str(int.from_bytes(os.urandom(16), "little")).zfill(40)[:40].encode())]


# ---- reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    """A tensor found in a torch file: safetensors dtype name, shape, element stride, absolute
    byte offset of its first element in the file, and its storage key."""

    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    key: str

    def is_contiguous(self) -> bool:
        return self.stride == contiguous_strides(self.shape) or any(s == 0 for s in self.shape)

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class _Storage:
    dtype: str
    key: str


class _Unpickler(pickle.Unpickler):
    """Maps torch's tensor and storage references to plain records; refuses anything else unknown."""

    def __init__(self, f, offsets: dict[str, int]):
        super().__init__(f)
        self._offsets = offsets

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild
        if module == "torch" and name in _BY_STORAGE:
            return _BY_STORAGE[name]
        if module == "torch" and name in _BY_TORCH:
            return Global("torch", name)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        raise pickle.UnpicklingError(f"unsupported global {module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in DTYPES):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        return _Storage(pid[1], str(pid[2]))

    def _rebuild(self, storage: _Storage, offset: int, shape, stride, *_rest) -> StoredTensor:
        start = self._offsets[f"data/{storage.key}"] + offset * DTYPES[storage.dtype][2]
        return StoredTensor(storage.dtype, tuple(shape), tuple(stride), start, storage.key)


def read_index(path: str | os.PathLike) -> Any:
    """The object pickled in torch file ``path`` with every tensor as a :class:`StoredTensor`
    (where its bytes are in the file) and dtypes as :class:`Global`. :class:`NotFast` for
    anything it cannot read this way (not a zip, compressed records, unknown classes): torch's
    own loader then reads it or words the error."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            prefix = infos[0].filename.split("/", 1)[0] + "/"
            offsets, sizes = {}, {}
            with open(path, "rb") as f:
                for info in infos:
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise ValueError("compressed record")
                    f.seek(info.header_offset)
                    name_len, extra_len = struct.unpack("<HH", f.read(_LOCAL.size)[26:30])
                    name = info.filename.removeprefix(prefix)
                    offsets[name] = info.header_offset + _LOCAL.size + name_len + extra_len
                    sizes[name] = info.file_size
                # read by offset: zipfile would check the CRC-32 fields torch leaves at 0
                f.seek(offsets["data.pkl"])
                return _Unpickler(io.BytesIO(f.read(sizes["data.pkl"])), offsets).load()
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError) as exc:
        raise NotFast(f"{path}: not readable without torch ({type(exc).__name__}: {exc})") from None
