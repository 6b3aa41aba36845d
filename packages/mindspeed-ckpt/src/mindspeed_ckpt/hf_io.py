"""Reading and writing Hugging Face safetensors checkpoint directories.

A directory holds ``config.json`` and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (``{"weight_map": {tensor name: shard file}}``). Reading is
lazy (one ``safe_open`` handle per shard, tensors pulled by name); writing fills shards up to
a byte budget and names them ``model-0000i-of-0000n.safetensors`` once ``n`` is known.

Both stream: tensors are read with ``pread``, or memory-mapped with their pages dropped once
used (``HFReader(mapped=True)``), so the resident set holds no whole shard; a writer given the
tensors' specs up front (``plan``) writes each tensor to disk as it is added, so memory holds
no whole shard either.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mindspeed_ckpt.memory import release_pages
from mindspeed_ckpt.plan import (  # noqa: F401 (re-exported)
    CONFIG,
    DEFAULT_SHARD_BYTES,
    INDEX,
    SINGLE,
    copy_side_files,
    read_json,
    read_weight_map,
    side_files,
)
from mindspeed_ckpt.safetensors_stream import SafetensorsFile, SafetensorsWriter


class HFReader:
    """Lazy access to the tensors of an HF checkpoint directory.

    ``names`` lists every tensor; ``get(name)`` returns one (KeyError if absent); ``spec(name)``
    is its (dtype, shape) without reading it. Shards are opened on first use and kept open.

    mapped=False: ``get`` reads into a new tensor with ``pread``, so memory holds only what
    the caller keeps. mapped=True: ``get`` returns a view of the memory-mapped shard
    (``safe_open``; no copy, faster), whose touched pages stay resident until
    :meth:`release`; the caller must not modify such tensors in place.
    """

    def __init__(self, hf_dir: str | os.PathLike, *, mapped: bool = False):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise ValueError(f"--hf-dir {self.dir}: not a directory")
        self.config = read_json(self.dir / CONFIG)
        self.mapped = mapped
        self._handles: dict[str, Any] = {}
        self._maps: dict[str, Any] = {}
        self._lent: list[torch.Tensor] = []  # mapped views handed out since the last release()
        self._where = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        wm = read_weight_map(self.dir)
        if wm is not None:
            return wm
        single = self.dir / SINGLE
        if not single.is_file():
            raise ValueError(f"{self.dir}: neither {SINGLE} nor {INDEX} found")
        return dict.fromkeys(self._open(SINGLE).keys(), SINGLE)

    def _open(self, shard: str) -> Any:
        if shard not in self._handles:
            path = self.dir / shard
            try:
                self._handles[shard] = SafetensorsFile(path)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
        return self._handles[shard]

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        shard = self._where[name]  # KeyError for an absent tensor, as the maps expect
        handle = self._open(shard)  # parses and checks the header either way
        try:
            if not self.mapped:
                return handle.get(name)
            if shard not in self._maps:
                self._maps[shard] = safe_open(str(self.dir / shard), framework="pt", device="cpu")
            t = self._maps[shard].get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{self.dir / shard}: cannot read tensor {name!r} ({exc})") from None
        self._lent.append(t)
        return t

    def release(self) -> None:
        """Drop the resident pages of the mapped tensors ``get`` returned since the last call
        (their values stay valid: pages are read again from the file when touched). No-op
        unless ``mapped``."""
        release_pages(self._lent)
        self._lent.clear()

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) of tensor ``name`` from its shard's header."""
        shard = self._where[name]
        try:
            return self._open(shard).spec(name)
        except KeyError:
            raise ValueError(f"{self.dir / shard}: tensor {name!r} listed in {INDEX} is not in the shard") from None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


Spec = tuple[str, torch.dtype, tuple[int, ...]]  # HF tensor name, dtype, shape


def plan_shards(specs: list[Spec], max_shard_bytes: int) -> list[list[Spec]]:
    """Greedy shards in ``specs`` order: a new shard when the next tensor would overflow a
    non-empty one (so a tensor larger than the budget gets a shard of its own)."""
    shards: list[list[Spec]] = []
    size = 0
    for spec in specs:
        n = _nbytes_of(spec[1], spec[2])
        if not shards or (shards[-1] and size + n > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def _nbytes_of(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def _shard_name(i: int, n: int) -> str:
    return SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


class HFWriter:
    """Writes tensors into shards of at most ``max_shard_bytes`` (a larger tensor gets a shard
    of its own). Call :meth:`add` per tensor, then :meth:`close` to name the shards and write
    the index (none when everything fits one ``model.safetensors``).

    plan: the (name, dtype, shape) of every tensor, in the order they will mostly arrive.
    With it each tensor goes to disk in :meth:`add` (shards are laid out in advance, each
    file closed once its last tensor is in), so memory holds no shard; without it a shard is
    buffered and written with ``safetensors.torch.save_file`` when full.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, plan: list[Spec] | None = None):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive; got {max_shard_bytes}")
        self.dir = out_dir
        self.max = max_shard_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self.total_bytes = 0
        self._planned: list[list[Spec]] | None = None
        if plan is not None:
            self._planned = plan_shards(list(plan), max_shard_bytes)
            self._shard_of = {name: i for i, shard in enumerate(self._planned) for name, _, _ in shard}
            if len(self._shard_of) != sum(map(len, self._planned)):
                raise ValueError("HFWriter plan: a tensor name appears twice")
            self._open: dict[int, SafetensorsWriter] = {}
            self._finished: set[int] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._planned is not None:
            self._add_planned(name, tensor)
            return
        if name in self._buf or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        if self._buf and self._buf_bytes + _nbytes(tensor) > self.max:
            self._flush()
        self._buf[name] = tensor.contiguous()
        self._buf_bytes += _nbytes(tensor)
        self.total_bytes += _nbytes(tensor)

    def _add_planned(self, name: str, tensor: torch.Tensor) -> None:
        i = self._shard_of.get(name)
        if i is None:
            raise ValueError(f"tensor {name!r} is not in the HFWriter plan")
        if i in self._finished:
            raise ValueError(f"tensor {name!r} written twice")
        if i not in self._open:
            path = self.dir / _shard_name(i, len(self._planned))
            self._open[i] = SafetensorsWriter(path, self._planned[i], metadata={"format": "pt"})
        w = self._open[i]
        w.write(name, tensor)
        self.total_bytes += _nbytes(tensor)
        if w.done:
            w.close()
            del self._open[i]
            self._finished.add(i)

    def _flush(self) -> None:
        if not self._buf:
            return
        tmp = f"shard-{len(self._shards):05d}.partial"
        save_file(self._buf, str(self.dir / tmp), metadata={"format": "pt"})
        self._shards.append((tmp, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> None:
        if self._planned is not None:
            self._close_planned()
            return
        self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.dir / self._shards[0][0], self.dir / SINGLE)
            return
        weight_map = {}
        for i, (tmp, names) in enumerate(self._shards):
            final = _shard_name(i, n)
            os.replace(self.dir / tmp, self.dir / final)
            weight_map.update(dict.fromkeys(names, final))
        self._write_index(weight_map)

    def _close_planned(self) -> None:
        for w in self._open.values():
            w.close()  # raises naming the first planned tensor never added
        self._open.clear()
        n = len(self._planned)
        unopened = [shard[0][0] for i, shard in enumerate(self._planned) if i not in self._finished]
        if unopened:
            raise ValueError(f"tensor {unopened[0]!r} is in the HFWriter plan but was never added")
        if n != 1:
            self._write_index({name: _shard_name(i, n) for name, i in self._shard_of.items()})

    def _write_index(self, weight_map: dict[str, str]) -> None:
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def save_hf(out_dir: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor],
            max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write a whole HF checkpoint directory (config.json + shards); for tests and small models."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    w = HFWriter(out, max_shard_bytes)
    for name, t in tensors.items():
        w.add(name, t)
    w.close()
