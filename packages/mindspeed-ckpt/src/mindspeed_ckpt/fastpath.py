"""Torch-free fast path of ``hf-to-mcore`` (legacy layout, no dtype cast): conversion as byte copies.

Every megatron tensor the maps make from HF tensors is a sequence of row blocks of those
tensors (``copy``; ``qkv``: per query group, that group's q rows, its k rows, its v rows;
``gate_up``: gate rows then up rows; ``vocab``: the rows then zero padding), and every TP shard
is a row range of it (dim 0; ``linear_fc1`` per half) or a column range of every row (dim 1).
So each rank file is planned up front as byte pieces of the HF shards (:mod:`mindspeed_ckpt.bytecopy`),
laid out as ``torch.save`` lays it out (:mod:`mindspeed_ckpt.torchfile`) and produced with in-kernel
copies, one thread per output file. Same checks and same output as
:func:`mindspeed_ckpt.convert.hf_to_mcore` (tensor for tensor; args included); never imports torch.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mindspeed_ckpt import maps, torchfile
from mindspeed_ckpt.bytecopy import Block, Inputs, Piece, as_pieces, column_pieces, row_slice, size, write_pieces
from mindspeed_ckpt.mcore_args import ITERATION, megatron_args
from mindspeed_ckpt.placement import Grid, Slot
from mindspeed_ckpt.plan import (
    CHECKPOINT_VERSION,
    CONFIG,
    FILE,
    HF_CONFIG_DIR,
    INDEX,
    PAGE_ALIGNMENT,
    SINGLE,
    check_hf_names,
    copy_side_files,
    iteration_dir,
    model_keys,
    placements,
    plan_output,
    rank_dir,
    read_json,
    read_weight_map,
    staging,
    write_tracker,
)
from mindspeed_ckpt.progress import Progress
from mindspeed_ckpt.sharding import GATE_UP, tp_dim
from mindspeed_ckpt.torchfile import NotFast

# Output files written at once (threads; the copies release the GIL). Two use both cores of the
# README's machine; more only queue on the same disk.
THREADS = int(os.environ.get("MINDSPEED_CKPT_THREADS", "2"))


@dataclass(frozen=True)
class Stored:
    """An HF tensor: input file index, absolute byte offset, safetensors dtype, shape."""

    file: int
    offset: int
    dtype: str
    shape: tuple[int, ...]


class HFIndex:
    """The tensors of an HF directory from the safetensors headers alone (no data read)."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise ValueError(f"--hf-dir {self.dir}: not a directory")
        self.config = read_json(self.dir / CONFIG)
        shards = self._shards()
        self.paths = [str(self.dir / s) for s in shards]
        self.tensors: dict[str, Stored] = {}
        for i, shard in enumerate(shards):
            self.tensors.update(_header(self.dir / shard, i))

    def _shards(self) -> list[str]:
        wm = read_weight_map(self.dir)
        if wm is not None:
            return sorted(set(wm.values()))
        if not (self.dir / SINGLE).is_file():
            raise ValueError(f"{self.dir}: neither {SINGLE} nor {INDEX} found")
        return [SINGLE]

    @property
    def names(self) -> list[str]:
        return list(self.tensors)


def _header(path: Path, file: int) -> dict[str, Stored]:
    size_ = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 0 or 8 + n > size_:
            raise ValueError(f"{path}: not a readable safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file (header is not JSON: {exc})") from None
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: not a readable safetensors file (tensor {name!r} has a malformed entry)") from None
        if dtype not in torchfile.DTYPES:
            raise NotFast(f"dtype {dtype}")
        if not 0 <= begin <= end <= size_ - 8 - n or end - begin != _nbytes(dtype, shape):
            raise ValueError(f"{path}: not a readable safetensors file (tensor {name!r}: offsets do not match its shape)")
        out[name] = Stored(file, 8 + n + begin, dtype, shape)
    return out


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = torchfile.DTYPES[dtype][2]
    for s in shape:
        n *= s
    return n


def _row_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    return _nbytes(dtype, shape[1:]) if shape else torchfile.DTYPES[dtype][2]


def rule_blocks(rule: maps.Rule, index: HFIndex) -> tuple[list[Block], int, str]:
    """The megatron tensor of ``rule`` as row blocks of HF tensors: (blocks, bytes per row, dtype).
    Checks each HF shape as :func:`maps.apply_hf_to_mcore` does."""
    src = []
    for name, shape in zip(rule.hf, rule.hf_shapes, strict=True):
        t = index.tensors.get(name)
        if t is None:
            raise ValueError(f"missing Hugging Face tensor {name!r} (needed for {rule.mcore!r})")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"Hugging Face tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)} from hf_config")
        src.append(t)
    if len({t.dtype for t in src}) > 1:
        raise NotFast("mixed dtypes in one rule")
    dtype, rb = src[0].dtype, _row_bytes(src[0].dtype, src[0].shape)
    whole = [Block(t.file, t.offset, t.shape[0] if t.shape else 1) for t in src]
    p = dict(rule.params)
    if rule.transform == "qkv":
        per, hd = p["heads"] // p["groups"], p["head_dim"]
        q, k, v = src
        blocks = []
        for g in range(p["groups"]):
            blocks += [Block(q.file, q.offset + g * per * hd * rb, per * hd), Block(k.file, k.offset + g * hd * rb, hd),
                       Block(v.file, v.offset + g * hd * rb, hd)]
        return blocks, rb, dtype
    if rule.transform == "vocab":
        return [whole[0], Block(None, 0, p["padded_vocab"] - src[0].shape[0])], rb, dtype
    if rule.transform in ("copy", "gate_up"):
        return whole, rb, dtype
    raise NotFast(f"transform {rule.transform}")


def _divisible(local: str, n: int, parts: int, dim: int) -> None:
    if n % parts:  # the torch path's message (sharding.split_tp)
        raise ValueError(f"megatron tensor {local!r}: dim {dim} of size {n} is not divisible by --tp {parts}")


def shard_pieces(local: str, blocks: list[Block], rb: int, shape: tuple[int, ...], tp: int, rank: int) -> list[Piece]:
    """TP rank ``rank``'s shard of the tensor the blocks make (as :func:`mindspeed_ckpt.sharding.split_tp`)."""
    dim = tp_dim(local)
    rows = shape[0] if shape else 1
    if dim is None or tp == 1:
        return as_pieces(blocks, rb)
    if dim == 1:
        _divisible(local, shape[1], tp, 1)
        return column_pieces(blocks, rb, rank * rb // tp, rb // tp)
    if local.endswith(GATE_UP):
        _divisible(local, rows, 2, 0)
        half = rows // 2
        _divisible(local, half, tp, 0)
        n = half // tp
        gate, up = row_slice(blocks, rank * n, rank * n + n, rb), row_slice(blocks, half + rank * n, half + rank * n + n, rb)
        return as_pieces(gate + up, rb)
    _divisible(local, rows, tp, 0)
    n = rows // tp
    return as_pieces(row_slice(blocks, rank * n, rank * n + n, rb), rb)


@dataclass
class RankPlan:
    """One output rank file: its path, per tensor (chunk, local name, dtype, shard shape, pieces)."""

    path: Path
    tensors: list[tuple[int, str, str, tuple[int, ...], list[Piece]]]


def _shard_shape(local: str, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
    dim = tp_dim(local)
    if dim is None or tp == 1:
        return shape
    return tuple(s // tp if d == dim else s for d, s in enumerate(shape))


def plan_files(tmp: Path, plan: list[list[tuple[maps.Rule, Slot]]], index: HFIndex, *, tp: int, grid: Grid) -> list[RankPlan]:
    """Every rank file of the output, in the torch path's order."""
    out = []
    for stage, items in enumerate(plan):
        for e in range(grid.ep):
            files = [RankPlan(tmp / iteration_dir(ITERATION) / rank_dir(t, stage, grid.pp, e, grid.ep) / FILE, [])
                     for t in range(tp)]
            for rule, slot in items:
                if slot.ep_rank not in (None, e):
                    continue
                blocks, rb, dtype = rule_blocks(rule, index)
                shape = _shard_shape(slot.local, tuple(rule.mcore_shape), tp)
                for t, f in enumerate(files):
                    pieces = shard_pieces(slot.local, blocks, rb, rule.mcore_shape, tp, t)
                    f.tensors.append((slot.chunk, slot.local, dtype, shape, pieces))
            out += files
    return out


def write_rank(rp: RankPlan, inputs: Inputs, vpp: int, args: torchfile.Namespace, progress) -> None:
    """Lay out, pre-size and fill one rank file."""
    models: list[dict] = [{} for _ in range(vpp)]
    for key, (chunk, local, dtype, shape, _) in enumerate(rp.tensors):
        if local in models[chunk]:
            raise ValueError(f"{rp.path}: tensor {local!r} written twice")
        models[chunk][local] = torchfile.TensorRecord(str(key), dtype, shape)
    ckpt = dict(zip(model_keys(vpp), models, strict=True))
    ckpt.update(checkpoint_version=CHECKPOINT_VERSION, iteration=ITERATION, args=args)
    # Page-aligned storages (a valid torch.save layout: torch.serialization.config.save.storage_alignment
    # = 4096 writes the same), so mcore-to-hf copies whole pages into the page-aligned safetensors data.
    small = torchfile.small_records(torchfile.dumps(ckpt), PAGE_ALIGNMENT)
    archive = rp.path.stem
    names = [(f"data/{k}", size(t[4])) for k, t in enumerate(rp.tensors)] + [(n, len(c)) for n, c in small]
    records, total = torchfile.layout(archive, names, PAGE_ALIGNMENT)
    rp.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(rp.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, total)  # pre-sized: zero padding rows stay holes
        for off, raw in torchfile.headers(archive, records):
            os.pwrite(fd, raw, off)
        for rec, (_, content) in zip(records[len(rp.tensors):], small, strict=True):
            os.pwrite(fd, content, rec.data)
        for rec, t in zip(records, rp.tensors, strict=False):
            progress(write_pieces(inputs, t[4], fd, rec.data))
    finally:
        os.close(fd)


def _check_aliases(index: HFIndex, rule_list: list[maps.Rule]) -> None:
    """Alias HF tensors (a tied lm_head, MTP copies) must equal their original: compare the bytes."""
    owners = {r.mcore: r for r in rule_list if not r.alias}
    for rule in rule_list:
        if rule.alias and all(n in index.tensors for n in rule.hf):
            a, rb, _ = rule_blocks(rule, index)
            b, _, _ = rule_blocks(owners[rule.mcore], index)
            if not _same_bytes(index, as_pieces(a, rb), as_pieces(b, rb)):
                raise ValueError(f"{index.dir}: tensor {rule.hf[0]!r} differs from the tensor megatron shares it with "
                                 f"({rule.mcore!r}); megatron keeps one copy")


def _same_bytes(index: HFIndex, a: list[Piece], b: list[Piece]) -> bool:
    def stream(pieces):
        for p in pieces:
            if getattr(p, "file", None) is None:
                yield bytes(p.length)
                continue
            with open(index.paths[p.file], "rb") as f:
                f.seek(p.offset)
                for start in range(0, p.length, 16 << 20):
                    yield f.read(min(16 << 20, p.length - start))
    return b"".join(stream(a)) == b"".join(stream(b)) if size(a) < (64 << 20) else _chunks_equal(stream(a), stream(b))


def _chunks_equal(xs, ys) -> bool:
    bx, by = b"", b""
    for x in xs:
        bx += x
        while len(by) < len(bx):
            nxt = next(ys, None)
            if nxt is None:
                return False
            by += nxt
        if bx != by[:len(bx)]:
            return False
        by, bx = by[len(bx):], b""
    return not by and next(ys, None) is None


def hf_to_mcore(hf_dir: str | os.PathLike, out: str | os.PathLike, *, tp: int = 1, pp: int = 1, ep: int = 1, vpp: int = 1,
                num_layer_list=None, decoder_first_pipeline_num_layers: int | None = None,
                decoder_last_pipeline_num_layers: int | None = None, noop_layers=None,
                dtype: str | None = None,
                make_vocab_size_divisible_by: int = 128, overwrite: bool = False, progress: bool | None = None) -> Path:
    """:func:`mindspeed_ckpt.convert.hf_to_mcore` by byte copies (same arguments, checks and output).
    Raises :class:`NotFast` before writing anything when the conversion needs the torch path."""
    index = HFIndex(hf_dir)
    cfg = index.config
    lay = maps.layout(cfg)
    if ("proj_bias" in lay.features) != ("mlp_bias" in lay.features):
        raise NotFast("attention_bias != mlp_bias")  # the torch path words this error
    out_plan = plan_output(cfg, lay, tp=tp, pp=pp, vpp=vpp, ep=ep, num_layer_list=num_layer_list,
                           first=decoder_first_pipeline_num_layers, last=decoder_last_pipeline_num_layers,
                           noop_layers=noop_layers, divisible_by=make_vocab_size_divisible_by)
    grid, padded, rule_list = out_plan.grid, out_plan.padded, out_plan.rules
    check_hf_names(index, rule_list)
    hf_dtype = index.tensors[rule_list[0].hf[0]].dtype
    if dtype is not None and {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}.get(dtype) != hf_dtype:
        raise NotFast("dtype cast")
    _check_aliases(index, rule_list)
    args = megatron_args(cfg, lay, tp=tp, grid=grid, padded=padded, dtype=torchfile.torch_dtype(hf_dtype),
                         divisible_by=make_vocab_size_divisible_by, first=out_plan.first, last=out_plan.last,
                         layer_list=out_plan.layer_list)
    with staging(Path(out), overwrite) as tmp:
        files = plan_files(tmp, placements(rule_list, grid), index, tp=tp, grid=grid)
        prog = Progress("hf-to-mcore", sum(len(f.tensors) for f in files),
                        sum(size(t[4]) for f in files for t in f.tensors), enabled=progress)
        _write_all(files, index.paths, grid.vpp, torchfile.Namespace(vars(args)), prog)
        write_tracker(tmp, ITERATION)
        copy_side_files(index.dir, tmp / HF_CONFIG_DIR)
    prog.close()
    return Path(out)


def _write_all(files: list[RankPlan], paths: list[str], vpp: int, args: torchfile.Namespace, prog: Progress) -> None:
    lock = threading.Lock()

    def progress(n: int) -> None:
        with lock:
            prog.update(n)

    inputs = Inputs(paths)
    try:
        if THREADS <= 1:
            for f in files:
                write_rank(f, inputs, vpp, args, progress)
            return
        with ThreadPoolExecutor(THREADS) as pool:
            for fut in [pool.submit(write_rank, f, inputs, vpp, args, progress) for f in files]:
                fut.result()
    finally:
        inputs.close()
