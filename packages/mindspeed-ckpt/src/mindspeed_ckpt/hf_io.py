"""Reading and writing Hugging Face safetensors checkpoint directories.

A directory holds ``config.json`` and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (``{"weight_map": {tensor name: shard file}}``). Reading is
lazy (one ``safe_open`` handle per shard, tensors pulled by name); writing fills shards up to
a byte budget and names them ``model-0000i-of-0000n.safetensors`` once ``n`` is known.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; ValueError naming the file when missing or not a JSON object."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class HFReader:
    """Lazy access to the tensors of an HF checkpoint directory.

    ``names`` lists every tensor; ``get(name)`` loads one (KeyError if absent). Shards are
    opened on first use and kept open (they are memory-mapped, so this costs no RAM).
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise ValueError(f"--hf-dir {self.dir}: not a directory")
        self.config = read_json(self.dir / CONFIG)
        self._handles: dict[str, Any] = {}
        self._where = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.dir / INDEX
        if index.exists():
            wm = read_json(index).get("weight_map")
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
            for shard in sorted(set(wm.values())):
                if not (self.dir / shard).is_file():
                    raise ValueError(f"{self.dir / shard}: shard listed in {INDEX} not found")
            return dict(wm)
        single = self.dir / SINGLE
        if not single.is_file():
            raise ValueError(f"{self.dir}: neither {SINGLE} nor {INDEX} found")
        return dict.fromkeys(self._open(SINGLE).keys(), SINGLE)

    def _open(self, shard: str) -> Any:
        if shard not in self._handles:
            path = self.dir / shard
            try:
                self._handles[shard] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
        return self._handles[shard]

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        shard = self._where[name]  # KeyError for an absent tensor, as the maps expect
        handle = self._open(shard)
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise ValueError(f"{self.dir / shard}: cannot read tensor {name!r} ({exc})") from None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class HFWriter:
    """Writes tensors into shards of at most ``max_shard_bytes`` (a larger tensor gets a shard
    of its own). Call :meth:`add` per tensor, then :meth:`close` to name the shards and write
    the index (none when everything fits one ``model.safetensors``)."""

    def __init__(self, out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive; got {max_shard_bytes}")
        self.dir = out_dir
        self.max = max_shard_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # temporary file name, tensor names
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._buf or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        if self._buf and self._buf_bytes + _nbytes(tensor) > self.max:
            self._flush()
        self._buf[name] = tensor.contiguous()
        self._buf_bytes += _nbytes(tensor)
        self.total_bytes += _nbytes(tensor)

    def _flush(self) -> None:
        if not self._buf:
            return
        tmp = f"shard-{len(self._shards):05d}.partial"
        save_file(self._buf, str(self.dir / tmp), metadata={"format": "pt"})
        self._shards.append((tmp, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.dir / self._shards[0][0], self.dir / SINGLE)
            return
        weight_map = {}
        for i, (tmp, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / tmp, self.dir / final)
            weight_map.update(dict.fromkeys(names, final))
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


def side_files(src: Path) -> Iterator[Path]:
    """The non-weight files of an HF directory (config, generation config, tokenizer files)."""
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != INDEX and not p.name.endswith(".partial"):
            yield p


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy :func:`side_files` of ``src`` into ``dst`` (created)."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in side_files(src):
        shutil.copy2(p, dst / p.name)
