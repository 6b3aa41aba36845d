"""Writing a ``torch.save`` file one tensor at a time.

``torch.save(obj, f)`` pickles ``obj`` whole, so every tensor must be in memory at once. The
file it writes is a zip archive (stored, not compressed): ``<archive>/data.pkl`` is the
pickle, in which each tensor is ``torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, requires_grad, hooks)`` and each storage is a *persistent id* ``("storage",
torch.<Dtype>Storage, key, location, numel)`` naming the record ``<archive>/data/<key>`` that
holds its bytes. ``torch.load`` looks records up by name, so their order does not matter.

:class:`TorchZipWriter` writes each tensor's bytes as its own record as soon as it is added
(the caller can free it), keeps only a :class:`TensorRef` (dtype, shape, key), and at
:meth:`TorchZipWriter.close` pickles the object tree with the refs standing for the tensors.
The result loads with ``torch.load`` (``mmap=True`` and ``weights_only=True`` included) as
if ``torch.save`` had written it; the zip writer is torch's own ``torch._C.PyTorchFileWriter``
(it aligns records for ``mmap``).
"""

from __future__ import annotations

import collections
import functools
import io
import os
import pickle
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from mindspeed_ckpt.torchfile import contiguous_strides

ALIGNMENT = 64  # torch's default record alignment; torch.load(mmap=True) reads it from .storage_alignment


@dataclass(frozen=True)
class TensorRef:
    """A tensor already written to a :class:`TorchZipWriter`: record ``key``, dtype, shape
    (contiguous, offset 0). Put it in the object given to :meth:`TorchZipWriter.close`."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@functools.cache
def _storage_class(dtype: torch.dtype) -> type:
    # torch.save pickles a storage by its legacy typed class (torch.BFloat16Storage, ...);
    # torch.load (weights_only included) maps the class back to the dtype.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage is deprecated, yet it is the file format
        return getattr(torch, torch.storage.TypedStorage(dtype=dtype, device="cpu")._pickle_storage_type())


def _bytes_of(t: torch.Tensor) -> torch.UntypedStorage:
    """The bytes of contiguous ``t`` as a storage (a slice: no copy)."""
    start = t.storage_offset() * t.element_size()
    return t.untyped_storage()[start:start + t.numel() * t.element_size()]


class _StorageRef:
    """Stands for a written storage inside the pickle (turned into a persistent id)."""

    __slots__ = ("ref",)

    def __init__(self, ref: TensorRef):
        self.ref = ref


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            r = obj.ref
            return ("storage", _storage_class(r.dtype), r.key, "cpu", r.nbytes() // r.dtype.itemsize)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, TensorRef):
            args = (_StorageRef(obj), 0, obj.shape, contiguous_strides(obj.shape), False, collections.OrderedDict())
            return torch._utils._rebuild_tensor_v2, args
        if isinstance(obj, torch.Tensor):
            raise TypeError("TorchZipWriter.close: the object holds a torch.Tensor; add it with add() and pass its TensorRef")
        return NotImplemented


def _open_writer(path: str) -> Any:
    try:
        # No CRC-32: torch.load does not check it, and it costs a pass over every byte.
        return torch._C.PyTorchFileWriter(path, False, ALIGNMENT)
    except TypeError:  # torch < 2.5: file name only (CRC on, alignment 64)
        return torch._C.PyTorchFileWriter(path)


class TorchZipWriter:
    """Streams tensors into a ``torch.save``-format file at ``path``.

    ``ref = w.add(tensor)`` writes the tensor's bytes now (a non-contiguous tensor is copied
    first) and returns a :class:`TensorRef`; ``w.close(obj)`` writes the pickle of ``obj``,
    in which refs become the tensors, and finishes the file. Peak memory: one tensor (plus its
    contiguous copy). Use as a context manager to close the file on error (nothing valid is
    left then: the caller removes it).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._zip = _open_writer(self.path)
        self._n = 0
        self.bytes_written = 0

    def add(self, tensor: torch.Tensor) -> TensorRef:
        """Write one CPU tensor's data (any dtype, shape, strides); returns its ref."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"TorchZipWriter.add: expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device.type != "cpu":
            raise ValueError(f"TorchZipWriter.add: tensor on {tensor.device}; move it to the CPU first")
        if self._zip is None:
            raise ValueError(f"{self.path}: TorchZipWriter already closed")
        t = tensor.detach().contiguous()
        ref = TensorRef(str(self._n), t.dtype, tuple(t.shape))
        nbytes = ref.nbytes()
        name = f"data/{ref.key}"
        if not nbytes:
            self._zip.write_record(name, b"", 0)
        else:
            try:
                self._zip.write_record(name, _bytes_of(t), nbytes)
            except TypeError:  # older torch takes a data pointer (newer ones deprecate that)
                self._zip.write_record(name, t.data_ptr(), nbytes)
        self._n += 1
        self.bytes_written += nbytes
        return ref

    def close(self, obj: Any) -> None:
        """Pickle ``obj`` (refs standing for tensors) as ``data.pkl`` and finish the archive."""
        if self._zip is None:
            raise ValueError(f"{self.path}: TorchZipWriter already closed")
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)  # torch.save's default protocol
        data = buf.getvalue()
        z = self._zip
        z.write_record("data.pkl", data, len(data))
        z.write_record(".format_version", "1", 1)
        z.write_record(".storage_alignment", str(ALIGNMENT), len(str(ALIGNMENT)))
        z.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        z.write_end_of_file()
        self._zip = None

    def abort(self) -> None:
        """Drop the writer without finishing the file (it is not loadable)."""
        self._zip = None

    def __enter__(self) -> TorchZipWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
