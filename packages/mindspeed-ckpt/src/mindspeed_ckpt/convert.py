"""Streaming conversion between HF safetensors directories and Megatron legacy checkpoints.

``hf_to_mcore`` writes the TP rank files of one (PP stage, EP rank) together: it walks the
rules placed there (all VPP chunks of the stage, that EP rank's experts), pulls the HF tensors
lazily (memory-mapped, pages dropped once used), builds each full megatron tensor and appends
each TP shard of it to its file at once, so memory holds about one full tensor, never a rank
file. ``mcore_to_hf`` streams the full tensors of :func:`mindspeed_ckpt.reader.read_mcore` (one
stage's rank files memory-mapped at a time) straight into size-bounded HF shards laid out in
advance (:func:`hf_plan`). Both write into a temporary sibling of ``out`` and rename it into
place at the end, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from math import prod
from pathlib import Path

import torch

from mindspeed_ckpt import maps
from mindspeed_ckpt.hf_io import CONFIG, DEFAULT_SHARD_BYTES, HFReader, HFWriter, copy_side_files
from mindspeed_ckpt.lora import open_lora
from mindspeed_ckpt.maps.config import model_type
from mindspeed_ckpt.mcore_args import ITERATION, megatron_args
from mindspeed_ckpt.megatron_io import RankWriter, args_get, write_tracker
from mindspeed_ckpt.memory import bound_heap
from mindspeed_ckpt.pipeline import WriteBehind
from mindspeed_ckpt.placement import Grid, Slot
from mindspeed_ckpt.plan import check_hf_names, placements, plan_output, staging
from mindspeed_ckpt.progress import Progress
from mindspeed_ckpt.reader import HF_CONFIG_DIR, read_mcore
from mindspeed_ckpt.sharding import GATE_UP, split_tp, tp_dim

# Pending background writes (0: write inline). 1 overlaps writes with reads on two cores, but showed no
# measurable gain on the 2-core machine of the README table, so it is opt-in.
WRITE_BEHIND = int(os.environ.get("MINDSPEED_CKPT_WRITE_BEHIND", "0"))
DTYPES: Mapping[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_aliases(reader: HFReader, rule_list: list[maps.Rule]) -> None:
    owners = {r.mcore: r for r in rule_list if not r.alias}
    have = set(reader.names)
    for rule in rule_list:
        if rule.alias and all(n in have for n in rule.hf):
            _, dup = maps.apply_hf_to_mcore(rule, reader.get)
            _, orig = maps.apply_hf_to_mcore(owners[rule.mcore], reader.get)
            if not torch.equal(dup, orig):
                raise ValueError(f"{reader.dir}: tensor {rule.hf[0]!r} differs from the tensor megatron shares it with "
                                 f"({rule.mcore!r}); megatron keeps one copy")




def _shard_bytes(rule: maps.Rule, slot: Slot, tp: int, itemsize: int) -> int:
    n = prod(rule.mcore_shape) * itemsize
    return n // tp if tp_dim(slot.local) is not None else n


def _shard(local: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """``split_tp`` without its copy where the shard is the full tensor or a block of whole
    rows: the rank writers store only a view's own bytes, so a view is enough there."""
    dim = tp_dim(local)
    if tp == 1 or dim is None:
        return full
    rows = full.shape[0] // tp
    if dim == 0 and not local.endswith(GATE_UP) and rows * tp == full.shape[0] and full.is_contiguous():
        return full.narrow(0, rank * rows, rows)
    return split_tp(local, full, tp, rank)  # a copy (or its error for a size TP does not divide)


def write_stage(tmp: Path, stage: int, items: list[tuple[maps.Rule, Slot]], source: Callable[[maps.Rule], torch.Tensor], *,
                tp: int, grid: Grid, cast: torch.dtype | None, args, prog: Progress) -> None:
    """Write every (EP rank, TP rank) file of pipeline stage ``stage``: per EP rank, its TP
    files are open together and each full tensor is split and streamed into all of them at
    once (:class:`~mindspeed_ckpt.megatron_io.RankWriter`), so memory holds one full tensor and
    one shard, never a rank file. ``source(rule)`` returns the full (TP1) megatron tensor of
    ``rule`` (built from HF tensors by hf_to_mcore, read from another megatron checkpoint by
    reshard); it is called once per rule and EP rank."""
    def write(writers: list[RankWriter], slot: Slot, full: torch.Tensor) -> None:
        for t, w in enumerate(writers):
            shard = _shard(slot.local, full, tp, t)
            w.add(slot.chunk, slot.local, shard)
            prog.update(shard.numel() * shard.element_size())

    for e in range(grid.ep):
        mine = [(r, s) for r, s in items if s.ep_rank in (None, e)]
        writers = [RankWriter(tmp, ITERATION, t, stage, grid.pp, ep_rank=e, ep=grid.ep, vpp=grid.vpp) for t in range(tp)]
        with WriteBehind(WRITE_BEHIND) as behind:  # writes tensor n while tensor n + 1 is read and built
            for rule, slot in mine:
                full = source(rule)
                behind.submit(write, writers, slot, full if cast is None else full.to(cast))
                del full
        for w in writers:
            w.close(args)


def hf_to_mcore(hf_dir: str | os.PathLike, out: str | os.PathLike, *, tp: int = 1, pp: int = 1, ep: int = 1, vpp: int = 1,
                num_layer_list: str | Sequence[int] | None = None, decoder_first_pipeline_num_layers: int | None = None,
                decoder_last_pipeline_num_layers: int | None = None, noop_layers: str | Sequence[int] | None = None,
                dtype: str | None = None,
                make_vocab_size_divisible_by: int = 128, overwrite: bool = False, progress: bool | None = None) -> Path:
    """Convert an HF directory into a Megatron legacy checkpoint at ``out`` (TP x PP x EP rank
    files, VPP chunks ``model0..`` when ``vpp > 1``, iteration 1) plus ``out/hf_config/``
    (config and tokenizer files).

    num_layer_list: decoder layers per PP stage (``"1,3"``); or megatron's
    ``decoder_first/last_pipeline_num_layers``; default an even split. ep: expert-parallel size
    (must divide the routed experts; expert TP is 1). dtype: one of ``DTYPES`` (default: keep
    the HF dtype). progress: stderr progress line (None: when stderr is a terminal).
    Raises ValueError for bad input (one line, naming the flag or file and the fix).
    """
    bound_heap()  # peak memory follows the live tensors (see mindspeed_ckpt.memory)
    reader = HFReader(hf_dir, mapped=True)  # zero-copy reads; pages dropped after each tensor (source below)
    cfg = reader.config
    lay = maps.layout(cfg)
    if ("proj_bias" in lay.features) != ("mlp_bias" in lay.features):
        # megatron has one switch (add_bias_linear) for the attention output and MLP biases
        raise NotImplementedError(f"{reader.dir / CONFIG}: attention_bias and mlp_bias differ; megatron's add_bias_linear "
                                  "covers both, so they must agree")
    out_plan = plan_output(cfg, lay, tp=tp, pp=pp, vpp=vpp, ep=ep, num_layer_list=num_layer_list,
                           first=decoder_first_pipeline_num_layers, last=decoder_last_pipeline_num_layers,
                           noop_layers=noop_layers, divisible_by=make_vocab_size_divisible_by)
    grid, padded, rule_list = out_plan.grid, out_plan.padded, out_plan.rules
    check_hf_names(reader, rule_list)
    _check_aliases(reader, rule_list)
    reader.release()
    cast = DTYPES[dtype] if dtype is not None else None
    out_dtype = cast or reader.spec(rule_list[0].hf[0])[0]
    args = megatron_args(cfg, lay, tp=tp, grid=grid, padded=padded, dtype=out_dtype, divisible_by=make_vocab_size_divisible_by,
                         first=out_plan.first, last=out_plan.last, layer_list=out_plan.layer_list)
    plan = placements(rule_list, grid)
    per_file = [[(r, s) for r, s in items if s.ep_rank in (None, e)] for items in plan for e in range(ep)]
    itemsize = out_dtype.itemsize
    prog = Progress("hf-to-mcore", tp * sum(map(len, per_file)),
                    tp * sum(_shard_bytes(r, s, tp, itemsize) for f in per_file for r, s in f), enabled=progress)

    def source(rule: maps.Rule) -> torch.Tensor:
        reader.release()  # the previous tensor is written: drop the mapped pages it touched
        return maps.apply_hf_to_mcore(rule, reader.get)[1]

    with staging(Path(out), overwrite) as tmp:
        for stage, items in enumerate(plan):
            write_stage(tmp, stage, items, source, tp=tp, grid=grid, cast=cast, args=args, prog=prog)
        write_tracker(tmp, ITERATION)
        copy_side_files(reader.dir, tmp / HF_CONFIG_DIR)
    prog.close()
    return Path(out)


def hf_plan(ck, owners: Mapping[str, maps.Rule], copies: Mapping[str, list[maps.Rule]]) -> list[tuple[str, torch.dtype, tuple]]:
    """(HF name, dtype, shape) of every HF tensor mcore_to_hf writes, in the order it writes them
    (from the rank files' indexes: no tensor data is read), so HFWriter can stream each to disk."""
    plan = []
    for name, dtype in ck.dtypes():
        for rule in (owners[name], *copies.get(name, ())) if name in owners else ():
            plan += [(h, dtype, tuple(shape)) for h, shape in zip(rule.hf, rule.hf_shapes, strict=True)]
    return plan


def mcore_to_hf(mcore_dir: str | os.PathLike, out: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool | None = None,
                lora_dir: str | os.PathLike | None = None, lora_alpha: float | None = None,
                lora_rank: int | None = None) -> Path:
    """Convert a Megatron legacy checkpoint (any TP x PP x VPP x EP, layer split read from its
    args) into an HF directory at ``out``: the config and tokenizer files of ``hf_config``
    (default ``mcore_dir/hf_config``) plus safetensors shards of at most ``max_shard_bytes``
    (with an index when more than one). LoRA adapters (HF PEFT or Megatron layout in
    ``lora_dir``, or Megatron ones inside the rank files) are merged into the base weights;
    ``lora_alpha`` / ``lora_rank`` override what the adapter says (:mod:`mindspeed_ckpt.lora`).
    A torch_dist checkpoint goes to :func:`mindspeed_ckpt.torch_dist.torch_dist_to_hf`."""
    from mindspeed_ckpt import torch_dist  # imports this module: import it late

    if torch_dist.is_torch_dist(mcore_dir):
        if lora_dir is not None or lora_alpha is not None or lora_rank is not None:
            # reshard reads legacy checkpoints only, so there is no route through it either: say what works.
            raise NotImplementedError(f"LoRA merging (--lora-dir/--lora-alpha/--lora-rank) is not supported for the "
                                      f"torch_dist checkpoint {mcore_dir}; export the "
                                      "base with mcore-to-hf and merge a PEFT adapter with peft's merge_and_unload, or "
                                      "convert from a legacy checkpoint")
        return torch_dist.torch_dist_to_hf(mcore_dir, out, hf_config=hf_config, overwrite=overwrite,
                                           max_shard_bytes=max_shard_bytes, progress=progress)
    bound_heap()  # peak memory follows the live tensors (see mindspeed_ckpt.memory)
    ck = read_mcore(mcore_dir, hf_config)
    lora = open_lora(ck, lora_dir, alpha=lora_alpha, rank=lora_rank)  # Megatron adapters hook into ck's reader
    rule_list = maps.rules(ck.hf_config, padded_vocab_size=ck.padded_vocab_size)
    owners = {r.mcore: r for r in rule_list if not r.alias}
    copies: dict[str, list[maps.Rule]] = {}
    for r in rule_list:
        if r.alias and not r.optional:  # DeepSeek's per-MTP-layer embedding / head copies
            copies.setdefault(r.mcore, []).append(r)
    saved = args_get(ck.args, "params_dtype")
    itemsize = saved.itemsize if isinstance(saved, torch.dtype) else 4  # only sizes the progress line
    prog = Progress("mcore-to-hf", len(owners), sum(prod(r.mcore_shape) for r in owners.values()) * itemsize,
                    enabled=progress)
    seen: set[str] = set()
    with staging(Path(out), overwrite) as tmp:
        writer = HFWriter(tmp, max_shard_bytes, plan=hf_plan(ck, owners, copies))
        with WriteBehind(WRITE_BEHIND) as behind:  # writes tensor n while tensor n + 1 is merged
            for name, full in ck.tensors():
                if name not in owners or name in seen:
                    raise ValueError(f"{ck.legacy.step_dir}: unexpected tensor {name!r} (global name) for model_type "
                                     f"{model_type(ck.hf_config)!r} and this config.json; pass the matching --hf-config")
                seen.add(name)
                for rule in (owners[name], *copies.get(name, ())):
                    for hf_name, t in maps.apply_mcore_to_hf(rule, {name: full}.__getitem__):
                        behind.submit(writer.add, hf_name, t if lora is None else lora.merge_hf(hf_name, t))
                prog.update(full.numel() * full.element_size())
        missing = [n for n in owners if n not in seen]
        if missing:
            raise ValueError(f"{ck.legacy.step_dir}: missing tensor {missing[0]!r} ({len(missing)} missing in all) for "
                             f"this config.json with TP={ck.tp} PP={ck.pp} VPP={ck.vpp} EP={ck.ep}")
        if lora is not None:
            lora.finish()
        writer.close()
        copy_side_files(ck.config_dir, tmp)
    prog.close()
    return Path(out)
