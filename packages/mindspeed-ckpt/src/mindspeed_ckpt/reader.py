"""Streaming reader of Megatron legacy checkpoints as one full (TP1 PP1 EP1) model.

::

    ck = read_mcore("ckpt/")                 # finds iter_*/mp_rank_* and ckpt/hf_config/config.json
    ck.hf_config["model_type"]
    for name, tensor in ck.tensors():        # global megatron-core names, full tensors
        ...

Rank files are memory-mapped one pipeline stage at a time (all TP x EP files of that stage),
and the pages a tensor touched are dropped once it is merged or consumed
(:func:`mindspeed_ckpt.memory.release_pages`), so memory holds about one merged tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from mindspeed_ckpt import maps
from mindspeed_ckpt.hf_io import CONFIG, read_json
from mindspeed_ckpt.megatron_io import LegacyCheckpoint, args_get, chunks, grid_from_args, locate
from mindspeed_ckpt.memory import release_pages
from mindspeed_ckpt.placement import EMBEDDING
from mindspeed_ckpt.plan import HF_CONFIG_DIR
from mindspeed_ckpt.sharding import EXPERT, merge_tp


def _weights(sd: Mapping[str, Any], skip: Callable[[str], bool] | None = None) -> list[str]:
    return [k for k in sd if not k.endswith("._extra_state") and not (skip and skip(k))]


def _layer_list(args: Any) -> tuple[int, ...] | None:
    text = args_get(args, "num_layer_list")
    if not text:
        return None
    try:
        return tuple(int(x) for x in str(text).split(","))
    except ValueError:
        raise ValueError(f"saved args.num_layer_list={text!r} is not a comma list of integers") from None


class McoreCheckpoint:
    """A Megatron legacy checkpoint (any TP x PP x VPP x EP) read as a full model.

    hf_config: the model's HF config (dict, from ``config_dir/config.json``); grid: its :class:`~mindspeed_ckpt.placement.Grid`;
    tp, pp, vpp, ep: parallel sizes; padded_vocab_size: megatron's embedding rows (full model).
    """

    def __init__(self, ck: LegacyCheckpoint, config_dir: Path):
        if not (config_dir / CONFIG).is_file():
            raise ValueError(f"{config_dir / CONFIG}: file not found; pass --hf-config DIR holding the model's config.json")
        self.legacy, self.config_dir = ck, config_dir
        self.hf_config = hf_config = read_json(config_dir / CONFIG)
        first = ck.load(0, 0)
        self.args = first.get("args")
        for key, found in (("tensor_model_parallel_size", ck.tp), ("pipeline_model_parallel_size", ck.pp),
                           ("expert_model_parallel_size", ck.ep)):
            saved = args_get(self.args, key)
            if saved is not None and saved != found:
                raise ValueError(f"{ck.path(0, 0)}: args.{key}={saved} but the rank directories say {found}")
        self.layout = maps.layout(hf_config)
        vpp = len(chunks(first))
        self.grid = grid_from_args(self.layout, self.args, pp=ck.pp, vpp=vpp, ep=ck.ep, where=ck.path(0, 0))
        emb = chunks(first)[0].get(EMBEDDING)
        if not isinstance(emb, torch.Tensor):
            raise ValueError(f"{ck.path(0, 0)}: missing tensor {EMBEDDING!r}")
        self.padded_vocab_size = emb.shape[0] * ck.tp
        self.tp, self.pp, self.vpp, self.ep = ck.tp, ck.pp, vpp, ck.ep
        self._mapped: tuple[int, dict] | None = None  # get(): the last stage's rank files, kept mapped
        # set by mindspeed_ckpt.lora to merge Megatron LoRA adapters: names to leave out, and
        # shard_hook(stage, chunk, tp_rank, ep_rank, local name, shard, chunk state dict) -> shard
        self.skip_key: Callable[[str], bool] | None = None
        self.shard_hook: Callable[..., torch.Tensor] | None = None

    def _stage_files(self, stage: int) -> dict[tuple[int, int], list[Mapping[str, Any]]]:
        files = {}
        for t in range(self.tp):
            for e in range(self.ep):
                models = chunks(self.legacy.load(t, stage, e))
                if len(models) != self.vpp:
                    raise ValueError(f"{self.legacy.path(t, stage, e)}: holds {len(models)} model chunks, "
                                     f"{self.legacy.path(0, 0)} holds {self.vpp}")
                files[(t, e)] = models
        return files

    def _chunk_keys(self, files, stage: int, chunk: int) -> list[tuple[int, str, str]]:
        """(ep rank, local name, global name) of one chunk, checked consistent across ranks."""
        out = []
        shared = None
        for e in range(self.ep):
            keys = _weights(files[(0, e)][chunk], self.skip_key)
            for t in range(1, self.tp):
                if sorted(_weights(files[(t, e)][chunk], self.skip_key)) != sorted(keys):
                    raise ValueError(f"{self.legacy.path(t, stage, e)}: tensor names differ from "
                                     f"{self.legacy.path(0, stage, e)} (chunk {chunk})")
            dense = sorted(k for k in keys if EXPERT not in k)
            if shared is not None and dense != shared:
                raise ValueError(f"{self.legacy.path(0, stage, e)}: non-expert tensors differ from EP rank 0's")
            shared = dense
            for k in keys:
                if e and EXPERT not in k:
                    continue  # replicated over EP ranks: EP rank 0's copy is read
                g = self.grid.global_name(stage, chunk, e, k)
                if g is not None:
                    out.append((e, k, g))
        return out

    def _shards(self, files, stage: int, chunk: int, e: int, local: str) -> list[torch.Tensor]:
        shards = [files[(t, e)][chunk][local] for t in range(self.tp)]
        if self.shard_hook is not None:
            shards = [self.shard_hook(stage, chunk, t, e, local, x, files[(t, e)][chunk]) for t, x in enumerate(shards)]
        return shards

    def get(self, name: str) -> torch.Tensor:
        """The full (TP1 EP1) tensor of global megatron name ``name``, TP shards merged, reading only
        the rank files of the pipeline stage that owns it (that stage's files stay mapped for the
        next call, so walking names in model order maps each stage once). ValueError when absent."""
        slot = self.grid.place(name)[0]
        if self._mapped is None or self._mapped[0] != slot.stage:
            self._mapped = None  # unmap the previous stage before mapping the next
            self._mapped = (slot.stage, self._stage_files(slot.stage))
        files, e = self._mapped[1], slot.ep_rank or 0
        for t in range(self.tp):
            if slot.local not in files[(t, e)][slot.chunk]:
                raise ValueError(f"{self.legacy.path(t, slot.stage, e)}: missing tensor {slot.local!r} (global {name!r})")
        return merge_tp(slot.local, self._shards(files, slot.stage, slot.chunk, e, slot.local))

    def dtypes(self) -> list[tuple[str, torch.dtype]]:
        """(global name, dtype) of every tensor, in :meth:`tensors` order (reads only the file indexes)."""
        out = []
        for s in range(self.pp):
            files = self._stage_files(s)
            for c in range(self.vpp):
                out += [(g, files[(0, e)][c][k].dtype) for e, k, g in self._chunk_keys(files, s, c)]
            del files
        return out

    def names(self) -> list[str]:
        """Every global megatron tensor name, in :meth:`tensors` order (reads only the file indexes)."""
        out = []
        for s in range(self.pp):
            files = self._stage_files(s)
            for c in range(self.vpp):
                out += [g for _, _, g in self._chunk_keys(files, s, c)]
            del files
        return out

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(global megatron name at TP1 PP1 EP1, full tensor), stage by stage: TP shards merged,
        PP/VPP layers and EP experts renumbered globally, copies (a tied ``output_layer`` or the
        last stage's MTP embedding) skipped. Tensors are views of memory-mapped files or fresh
        concatenations; clone one to keep it past the stage."""
        for s in range(self.pp):
            files = self._stage_files(s)
            for c in range(self.vpp):
                for e, local, g in self._chunk_keys(files, s, c):
                    mapped = [files[(t, e)][c][local] for t in range(self.tp)]
                    full = merge_tp(local, self._shards(files, s, c, e, local))
                    if all(full.untyped_storage().data_ptr() != m.untyped_storage().data_ptr() for m in mapped):
                        release_pages(mapped)  # merged into a copy: the mapped pages are not needed any more
                    yield g, full
                    del full
                    release_pages(mapped)  # the consumer is done: drop the mapped pages it touched
            del files


def read_mcore(mcore_dir: str | os.PathLike, hf_config: str | os.PathLike | None = None) -> McoreCheckpoint:
    """Open a Megatron legacy checkpoint for streaming. ``hf_config``: a directory holding the
    model's ``config.json`` (default ``mcore_dir/hf_config``, where ``hf_to_mcore`` puts it).
    ValueError (one line, naming the file) for anything missing or inconsistent."""
    ck = locate(mcore_dir)
    return McoreCheckpoint(ck, Path(hf_config) if hf_config is not None else ck.root / HF_CONFIG_DIR)
