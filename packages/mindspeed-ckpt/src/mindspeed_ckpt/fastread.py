"""Torch-free fast path of ``mcore-to-hf`` (legacy checkpoint, no LoRA): conversion as byte copies.

The rank files are read as indexes only (:func:`mindspeed_ckpt.torchfile.read_index`: where each
tensor's bytes are); each full megatron tensor is planned as row blocks of its TP shards (dim 0:
the shards one after the other, ``linear_fc1`` per gate/up half; replicated: rank 0's, checked
equal to the others), or, for a dim-1 merge, as rows interleaved from the shards; each HF tensor
is a row range of it (``qkv``: per group q, k, v rows; ``gate_up``: halves; ``vocab``: without the
padding rows). The safetensors shards are laid out as :class:`mindspeed_ckpt.hf_io.HFWriter`
lays them out (byte-identical files) and filled by in-kernel copies from threads. Same checks and
output as :func:`mindspeed_ckpt.convert.mcore_to_hf`; never imports torch.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mindspeed_ckpt import maps, torchfile
from mindspeed_ckpt.bytecopy import Block, Inputs, Interleave, Piece, as_pieces, row_slice, size, write_pieces
from mindspeed_ckpt.maps.config import model_type
from mindspeed_ckpt.megatron_io import args_get, chunks, grid_from_args, locate
from mindspeed_ckpt.placement import EMBEDDING
from mindspeed_ckpt.plan import (
    CONFIG,
    DEFAULT_SHARD_BYTES,
    HF_CONFIG_DIR,
    INDEX,
    PAGE_ALIGNMENT,
    SINGLE,
    TRACKER,
    copy_side_files,
    iteration_dir,
    read_json,
    staging,
)
from mindspeed_ckpt.progress import Progress
from mindspeed_ckpt.sharding import EXPERT, GATE_UP, tp_dim
from mindspeed_ckpt.torchfile import NotFast, StoredTensor

# Threads writing tensors at once. Default 1: the output is one file, and a second thread measured more CPU
# (1.1-1.9 vs 1.0-1.1 s sys on 2.2 GB, README) for the same wall time (writers of one file serialize in ext4).
THREADS_HF = int(os.environ.get("MINDSPEED_CKPT_HF_THREADS", "1"))
Merged = tuple[list[Block] | None, Interleave | None, tuple[int, ...], str, int]  # blocks | interleave, shape, dtype, row bytes


def _read_args(path: Path) -> Any:
    return _index(path).get("args")


def _index(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    ckpt = torchfile.read_index(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model", ckpt.get("model0")), dict):
        raise ValueError(f"{path}: expected a dict with a 'model' (or VPP 'model0', ...) state dict (megatron legacy checkpoint)")
    return ckpt


class FastCheckpoint:
    """A legacy checkpoint's layout and tensor locations (the checks of :class:`mindspeed_ckpt.reader.McoreCheckpoint`)."""

    def __init__(self, mcore_dir: str | os.PathLike, hf_config: str | os.PathLike | None):
        self.legacy = ck = locate(mcore_dir, _read_args)
        self.config_dir = Path(hf_config) if hf_config is not None else ck.root / HF_CONFIG_DIR
        if not (self.config_dir / CONFIG).is_file():
            raise ValueError(f"{self.config_dir / CONFIG}: file not found; pass --hf-config DIR holding the model's config.json")
        self.hf_config = read_json(self.config_dir / CONFIG)
        first = _index(ck.path(0, 0))
        self.args = args = first.get("args")
        for key, found in (("tensor_model_parallel_size", ck.tp), ("pipeline_model_parallel_size", ck.pp),
                           ("expert_model_parallel_size", ck.ep)):
            saved = args_get(args, key)
            if saved is not None and saved != found:
                raise ValueError(f"{ck.path(0, 0)}: args.{key}={saved} but the rank directories say {found}")
        lay = maps.layout(self.hf_config)
        self.vpp = len(chunks(first))
        self.grid = grid_from_args(lay, args, pp=ck.pp, vpp=self.vpp, ep=ck.ep, where=ck.path(0, 0))
        emb = chunks(first)[0].get(EMBEDDING)
        if not isinstance(emb, StoredTensor):
            raise ValueError(f"{ck.path(0, 0)}: missing tensor {EMBEDDING!r}")
        self.padded_vocab_size = emb.shape[0] * ck.tp
        self.tp, self.pp, self.ep = ck.tp, ck.pp, ck.ep
        self.paths: list[str] = []

    def _file(self, path: Path) -> int:
        self.paths.append(str(path))
        return len(self.paths) - 1

    def stage(self, s: int) -> dict[tuple[int, int], tuple[int, list[dict]]]:
        """(TP rank, EP rank) -> (input file index, model chunks) of stage ``s``."""
        files = {}
        for t in range(self.tp):
            for e in range(self.ep):
                path = self.legacy.path(t, s, e)
                models = chunks(_index(path))
                if any(".lora_" in k for m in models for k in m):
                    raise NotFast("Megatron LoRA adapters in the rank files (merged by the torch path)")
                if len(models) != self.vpp:
                    raise ValueError(f"{path}: holds {len(models)} model chunks, {self.legacy.path(0, 0)} holds {self.vpp}")
                files[(t, e)] = (self._file(path), models)
        return files

    def chunk_keys(self, files, s: int, c: int) -> list[tuple[int, str, str]]:
        """(EP rank, local name, global name) of chunk ``c`` of stage ``s``, as McoreCheckpoint orders them."""
        out, shared = [], None
        for e in range(self.ep):
            keys = [k for k in files[(0, e)][1][c] if not k.endswith("._extra_state")]
            for t in range(1, self.tp):
                if sorted(k for k in files[(t, e)][1][c] if not k.endswith("._extra_state")) != sorted(keys):
                    raise ValueError(f"{self.legacy.path(t, s, e)}: tensor names differ from {self.legacy.path(0, s, e)} "
                                     f"(chunk {c})")
            dense = sorted(k for k in keys if EXPERT not in k)
            if shared is not None and dense != shared:
                raise ValueError(f"{self.legacy.path(0, s, e)}: non-expert tensors differ from EP rank 0's")
            shared = dense
            for k in keys:
                if e and EXPERT not in k:
                    continue
                g = self.grid.global_name(s, c, e, k)
                if g is not None:
                    out.append((e, k, g))
        return out


def _stored(files, c: int, e: int, local: str, tp: int) -> list[tuple[int, StoredTensor]]:
    out = []
    for t in range(tp):
        fid, models = files[(t, e)]
        x = models[c][local]
        if not isinstance(x, StoredTensor):
            raise ValueError(f"rank file tensor {local!r} is a {type(x).__name__}, not a tensor")
        if not x.is_contiguous() or (out and x.dtype != out[0][1].dtype):
            raise NotFast("non-contiguous or mixed-dtype shards")
        out.append((fid, x))
    return out


def _same_bytes(paths: list[str], a: tuple[int, StoredTensor], b: tuple[int, StoredTensor]) -> bool:
    def read(f: tuple[int, StoredTensor]) -> bytes:
        with open(paths[f[0]], "rb") as fh:
            fh.seek(f[1].offset)
            return fh.read(f[1].nbytes)
    return a[1].shape == b[1].shape and read(a) == read(b)


def merge(local: str, shards: list[tuple[int, StoredTensor]], paths: list[str]) -> Merged:
    """The full tensor of TP shards (as :func:`mindspeed_ckpt.sharding.merge_tp`), as row blocks or an interleave."""
    x0 = shards[0][1]
    shape, dtype = x0.shape, x0.dtype
    rb = x0.nbytes // shape[0] if shape and shape[0] else torchfile.DTYPES[dtype][2]
    rows = lambda x: x.shape[0] if x.shape else 1  # noqa: E731
    dim = tp_dim(local)
    if len(shards) == 1 or dim is None:
        for r, s in enumerate(shards[1:], start=1):
            if not _same_bytes(paths, shards[0], s):
                raise ValueError(f"megatron tensor {local!r} is replicated under TP but differs between rank 0 and rank {r}")
        return [Block(f, x.offset, rows(x)) for f, x in shards[:1]], None, shape, dtype, rb
    kept = shape[1:] if dim == 0 else shape[:1]  # the dims the merge does not concatenate
    if len(shape) < dim + 1 or any((x.shape[1:] if dim == 0 else x.shape[:1]) != kept for _, x in shards):
        raise NotFast("shards that torch.cat would refuse: the torch path words the error")
    if dim == 1:
        full = (shape[0], sum(x.shape[1] for _, x in shards), *shape[2:])
        return None, Interleave(tuple(f for f, _ in shards), tuple(x.offset for _, x in shards), shape[0], rb), full, dtype, 0
    full = (sum(x.shape[0] for _, x in shards), *shape[1:])
    if local.endswith(GATE_UP):
        for _, x in shards:
            if x.shape[0] % 2:
                raise ValueError(f"megatron tensor {local!r}: dim 0 of size {x.shape[0]} is not divisible by --tp 2")
        halves = [(Block(f, x.offset, x.shape[0] // 2), Block(f, x.offset + x.shape[0] // 2 * rb, x.shape[0] // 2))
                  for f, x in shards]
        return [h[0] for h in halves] + [h[1] for h in halves], None, full, dtype, rb
    return [Block(f, x.offset, rows(x)) for f, x in shards], None, full, dtype, rb


def hf_pieces(rule: maps.Rule, m: Merged) -> list[tuple[str, list[Piece]]]:
    """The HF tensors of ``rule`` from its merged megatron tensor (as :func:`maps.apply_mcore_to_hf`)."""
    blocks, inter, shape, _, rb = m
    if tuple(shape) != tuple(rule.mcore_shape):
        raise ValueError(f"megatron tensor {rule.mcore!r} has shape {tuple(shape)}, expected {tuple(rule.mcore_shape)} "
                         "from hf_config")
    if inter is not None:
        if rule.transform != "copy":
            raise NotFast(f"dim-1 merge into {rule.transform}")
        return [(rule.hf[0], [inter])]
    p, rows = dict(rule.params), shape[0] if shape else 1
    if rule.transform == "copy":
        return [(rule.hf[0], as_pieces(blocks, rb))]
    if rule.transform == "vocab":
        if rows < p["vocab"]:
            raise ValueError(f"tensor has {rows} rows, fewer than vocab_size={p['vocab']}")
        return [(rule.hf[0], as_pieces(row_slice(blocks, 0, p["vocab"], rb), rb))]
    if rule.transform == "gate_up":
        if rows % 2:
            raise ValueError(f"linear_fc1 has {rows} rows; a gated MLP needs an even count (gate|up)")
        return [(rule.hf[0], as_pieces(row_slice(blocks, 0, rows // 2, rb), rb)),
                (rule.hf[1], as_pieces(row_slice(blocks, rows // 2, rows, rb), rb))]
    if rule.transform == "qkv":
        per, hd, groups = p["heads"] // p["groups"], p["head_dim"], p["groups"]
        step = (per + 2) * hd
        q = [b for g in range(groups) for b in row_slice(blocks, g * step, g * step + per * hd, rb)]
        k = [b for g in range(groups) for b in row_slice(blocks, g * step + per * hd, g * step + (per + 1) * hd, rb)]
        v = [b for g in range(groups) for b in row_slice(blocks, g * step + (per + 1) * hd, (g + 1) * step, rb)]
        return [(n, as_pieces(x, rb)) for n, x in zip(rule.hf, (q, k, v), strict=True)]
    raise NotFast(f"transform {rule.transform}")


def plan_hf(ck: FastCheckpoint) -> list[tuple[str, str, tuple[int, ...], list[Piece]]]:
    """(HF name, dtype, shape, pieces) of every HF tensor, in :func:`mindspeed_ckpt.convert.mcore_to_hf`'s order."""
    rule_list = maps.rules(ck.hf_config, padded_vocab_size=ck.padded_vocab_size)
    owners = {r.mcore: r for r in rule_list if not r.alias}
    copies: dict[str, list[maps.Rule]] = {}
    for r in rule_list:
        if r.alias and not r.optional:
            copies.setdefault(r.mcore, []).append(r)
    out, seen = [], set()
    for s in range(ck.pp):
        files = ck.stage(s)
        for c in range(ck.vpp):
            for e, local, g in ck.chunk_keys(files, s, c):
                if g not in owners or g in seen:
                    raise ValueError(f"{ck.legacy.step_dir}: unexpected tensor {g!r} (global name) for model_type "
                                     f"{model_type(ck.hf_config)!r} and this config.json; pass the matching --hf-config")
                seen.add(g)
                m = merge(local, _stored(files, c, e, local, ck.tp), ck.paths)
                for rule in (owners[g], *copies.get(g, ())):
                    out += [(n, m[3], tuple(shape), pieces)
                            for (n, pieces), shape in zip(hf_pieces(rule, m), rule.hf_shapes, strict=True)]
    missing = [n for n in owners if n not in seen]
    if missing:
        raise ValueError(f"{ck.legacy.step_dir}: missing tensor {missing[0]!r} ({len(missing)} missing in all) for "
                         f"this config.json with TP={ck.tp} PP={ck.pp} VPP={ck.vpp} EP={ck.ep}")
    return out


def _shards(plan: list, max_bytes: int) -> list[list]:
    out, used = [], 0
    for item in plan:  # HFWriter's greedy rule (hf_io.plan_shards)
        n = size(item[3])
        if not out or (out[-1] and used + n > max_bytes):
            out.append([])
            used = 0
        out[-1].append(item)
        used += n
    return out


def _header(items: list) -> tuple[bytes, list[int]]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets, pos = [], 0
    for name, dtype, shape, pieces in items:
        n = size(pieces)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets.append(pos)
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % PAGE_ALIGNMENT)  # as safetensors_stream.SafetensorsWriter pads it
    return struct.pack("<Q", len(raw)) + raw, [8 + len(raw) + o for o in offsets]


def mcore_to_hf(mcore_dir: str | os.PathLike, out: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool | None = None) -> Path:
    """:func:`mindspeed_ckpt.convert.mcore_to_hf` by byte copies (legacy input, no LoRA). Raises
    :class:`NotFast` before writing anything when the torch path is needed."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive; got {max_shard_bytes}")
    tracker = Path(mcore_dir) / TRACKER
    text = tracker.read_text(encoding="utf-8").strip() if tracker.is_file() else ""
    if text and (Path(mcore_dir) / iteration_dir(text) / "metadata.json").is_file():
        raise NotFast("torch_dist checkpoint")
    ck = FastCheckpoint(mcore_dir, hf_config)
    plan = plan_hf(ck)
    shards = _shards(plan, max_shard_bytes)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    prog = Progress("mcore-to-hf", len(plan), sum(size(x[3]) for x in plan), enabled=progress)
    with staging(Path(out), overwrite) as tmp:
        _write_shards(tmp, names, shards, ck.paths, prog)
        if len(shards) > 1:
            weight_map = {item[0]: names[i] for i, shard in enumerate(shards) for item in shard}
            index = {"metadata": {"total_size": sum(size(x[3]) for x in plan)}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        copy_side_files(ck.config_dir, tmp)
    prog.close()
    return Path(out)


def _write_shards(tmp: Path, names: list[str], shards: list[list], paths: list[str], prog: Progress) -> None:
    """Every tensor of every shard is a task at its own offset (pwrite-style calls: threads may share a file)."""
    lock = threading.Lock()
    inputs, fds, tasks = Inputs(paths), [], []
    try:
        for name, items in zip(names, shards, strict=True):
            head, offsets = _header(items)
            fd = os.open(tmp / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            os.ftruncate(fd, offsets[-1] + size(items[-1][3]) if items else len(head))
            os.pwrite(fd, head, 0)
            tasks += [(fd, off, item[3]) for off, item in zip(offsets, items, strict=True)]

        def run(task) -> None:
            n = write_pieces(inputs, task[2], task[0], task[1])
            with lock:
                prog.update(n)

        if THREADS_HF <= 1:
            for task in tasks:
                run(task)
        else:
            with ThreadPoolExecutor(THREADS_HF) as pool:
                list(pool.map(run, tasks))
    finally:
        for fd in fds:
            os.close(fd)
        inputs.close()
