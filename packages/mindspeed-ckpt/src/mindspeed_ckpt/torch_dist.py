"""Megatron ``torch_dist`` checkpoints (torch.distributed.checkpoint, written by megatron-core's
``dist_checkpointing``) <-> Hugging Face directories.

Layout written by :func:`hf_to_torch_dist`::

    OUT/latest_checkpointed_iteration.txt   "1"
    OUT/iter_0000001/                       megatron-core dist_checkpointing.save(model.sharded_state_dict())
                                            (metadata.json, .metadata, __0_0.distcp, common.pt)
    OUT/hf_config/                          the HF config.json and tokenizer files

The sharded state holds global tensors with their sharding metadata, so megatron reloads it at
any TP / PP / EP: the conversion itself is done at world size 1 and takes no layout flags.

Unlike the legacy path this is **not streamed**: the whole model is built in memory (by
``mindspeed_models.load_pretrained``) before megatron saves it, and read whole before it is
written to HF. Peak host memory is about one copy of the model in the output dtype (plus
megatron-core's import, ~350 MiB). mindspeed-models (and through it megatron-core) is an
optional dependency, imported here lazily.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from math import prod
from pathlib import Path

import torch

from mindspeed_ckpt import maps
from mindspeed_ckpt.convert import DTYPES, staging
from mindspeed_ckpt.convert import _check_aliases as check_aliases
from mindspeed_ckpt.hf_io import DEFAULT_SHARD_BYTES, HFReader, HFWriter, copy_side_files, read_json
from mindspeed_ckpt.maps.config import model_type
from mindspeed_ckpt.mcore_args import ITERATION
from mindspeed_ckpt.megatron_io import TRACKER, iteration_dir, write_tracker
from mindspeed_ckpt.plan import check_hf_names
from mindspeed_ckpt.progress import Progress
from mindspeed_ckpt.reader import HF_CONFIG_DIR
from mindspeed_ckpt.sharding import padded_vocab_size

__all__ = ["hf_to_torch_dist", "is_torch_dist", "torch_dist_to_hf"]

METADATA = "metadata.json"  # megatron-core's marker of a dist_checkpointing directory
EMBEDDING = "embedding.word_embeddings.weight"
# flag -> default: layout flags of hf-to-mcore that a torch_dist checkpoint does not need
LAYOUT_FLAGS = {"tp": 1, "pp": 1, "ep": 1, "vpp": 1, "num_layer_list": None,
                "decoder_first_pipeline_num_layers": None, "decoder_last_pipeline_num_layers": None}
UNIMPLEMENTED_FLAGS = ("noop_layers", "progress")  # hf-to-mcore flags the torch_dist writer does not honour


def _models():
    # optional dependency: mindspeed-ckpt stays torch + safetensors + numpy without it
    if importlib.util.find_spec("mindspeed_models") is None:
        raise ImportError("the torch_dist format needs mindspeed-models (and megatron-core): pip install mindspeed-models")
    import mindspeed_models

    return mindspeed_models


def step_dir(mcore_dir: Path) -> Path | None:
    """``iter_N`` named by the tracker file of ``mcore_dir`` (None when there is no readable tracker)."""
    tracker = mcore_dir / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text(encoding="utf-8").strip()
    if text == "release":
        return mcore_dir / "release"
    return mcore_dir / iteration_dir(int(text)) if text.isdigit() else None


def is_torch_dist(mcore_dir: str | os.PathLike) -> bool:
    """Whether ``mcore_dir`` is a torch_dist checkpoint (its tracked ``iter_N/`` has ``metadata.json``)."""
    step = step_dir(Path(mcore_dir))
    return step is not None and (step / METADATA).is_file()


def hf_to_torch_dist(hf_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None,
                     make_vocab_size_divisible_by: int = 128, overwrite: bool = False) -> Path:
    """Convert an HF directory into a Megatron torch_dist checkpoint at ``out`` (layout in the
    module docstring), written by megatron-core's own ``dist_checkpointing.save``.

    dtype: one of ``DTYPES`` (default: keep the HF dtype). The vocabulary is zero-padded to a
    multiple of ``make_vocab_size_divisible_by`` (world size 1: megatron pads to N x TP, so to
    train at TP=T with megatron's default padding pass N x T). Holds the whole model in memory.
    Raises ValueError (bad input, one line) or ImportError (mindspeed-models missing).
    """
    if make_vocab_size_divisible_by < 1:
        raise ValueError(f"--make-vocab-size-divisible-by must be >= 1; got {make_vocab_size_divisible_by}")
    reader = HFReader(hf_dir)
    # the legacy path's checks, before megatron is imported: supported model_type, every tensor
    # present and known (MTP layers included), tied copies equal
    lay = maps.layout(reader.config)
    rule_list = maps.rules(reader.config, padded_vocab_size=padded_vocab_size(lay.dims["vocab"], make_vocab_size_divisible_by, 1))
    check_hf_names(reader, rule_list)
    check_aliases(reader, rule_list)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    out_dtype = DTYPES[dtype] if dtype is not None else reader.get(reader.names[0]).dtype
    mm = _models()
    from megatron.core import dist_checkpointing  # installed with mindspeed-models

    pm = mm.load_pretrained(reader.dir, dtype=out_dtype, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    with staging(Path(out), overwrite) as tmp:
        step = tmp / iteration_dir(ITERATION)
        step.mkdir()
        dist_checkpointing.save(pm.model.sharded_state_dict(), str(step))
        write_tracker(tmp, ITERATION)
        copy_side_files(reader.dir, tmp / HF_CONFIG_DIR)
    return Path(out)


def saved_dtype(step: Path) -> torch.dtype:
    """The dtype the embedding was saved in (read from the torch.distributed.checkpoint metadata).
    Raises NotImplementedError when the checkpoint holds LoRA adapter tensors: this path exports
    the base weights only, and dropping the adapters silently would export a different model."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(str(step)).read_metadata().state_dict_metadata
        dtype = meta[EMBEDDING].properties.dtype
    except (OSError, KeyError, AttributeError, ValueError) as exc:
        raise ValueError(f"{step}: not a readable torch_dist checkpoint with {EMBEDDING!r} ({exc!r})") from None
    adapters = sorted(name for name in meta if ".lora_A" in name or ".lora_B" in name)
    if adapters:
        raise NotImplementedError(f"{step}: holds LoRA adapter tensors ({adapters[0]!r}, {len(adapters)} in all); merging "
                                  "them from a torch_dist checkpoint is not supported: save the run in legacy format "
                                  "(--ckpt-format torch) and export that")
    return dtype


def torch_dist_to_hf(mcore_dir: str | os.PathLike, out: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                     overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     progress: bool | None = None) -> Path:
    """Convert a torch_dist checkpoint (any saved TP/PP/EP) into an HF directory at ``out``.

    The model is rebuilt from ``mcore_dir/hf_config/config.json`` in the saved dtype and loaded
    by megatron-core (``mindspeed_models.load_pretrained``), then written tensor by tensor.
    ``hf_config``: where the config and tokenizer files copied to ``out`` come from (default
    ``mcore_dir/hf_config``; its config.json must describe the same model).
    """
    mcore_dir = Path(mcore_dir)
    config_dir = Path(hf_config) if hf_config is not None else mcore_dir / HF_CONFIG_DIR
    if not (mcore_dir / HF_CONFIG_DIR / "config.json").is_file():
        raise ValueError(f"{mcore_dir}/{HF_CONFIG_DIR}/config.json is missing: a torch_dist checkpoint is rebuilt from it; "
                         "copy the model's HF config.json there")
    cfg = read_json(config_dir / "config.json")
    step = step_dir(mcore_dir)
    dtype = saved_dtype(step)
    pm = _models().load_pretrained(mcore_dir, dtype=dtype)
    state = {k: v for k, v in pm.model.state_dict().items() if not k.endswith("_extra_state")}
    with staging(Path(out), overwrite) as tmp:
        write_hf(tmp, cfg, state, padded_vocab_size=pm.spec.padded_vocab_size, where=step,
                 max_shard_bytes=max_shard_bytes, progress=progress)
        copy_side_files(config_dir, tmp)
    return Path(out)


def write_hf(tmp: Path, cfg: Mapping, state: Mapping[str, torch.Tensor], *, padded_vocab_size: int, where: Path,
             max_shard_bytes: int, progress: bool | None) -> None:
    """Map full megatron tensors (``state``: global name -> tensor) to HF names and write safetensors
    shards into ``tmp``; ValueError naming the first unexpected or missing tensor."""
    rule_list = maps.rules(dict(cfg), padded_vocab_size=padded_vocab_size)
    owners = {r.mcore: r for r in rule_list if not r.alias}
    copies: dict[str, list[maps.Rule]] = {}
    for r in rule_list:
        if r.alias and not r.optional:  # DeepSeek's per-MTP-layer embedding / head copies
            copies.setdefault(r.mcore, []).append(r)
    unexpected = sorted(set(state) - set(owners))
    missing = sorted(set(owners) - set(state))
    for what, names in (("unexpected", unexpected), ("missing", missing)):
        if names:
            raise ValueError(f"{where}: {what} tensor {names[0]!r} ({len(names)} in all) for model_type "
                             f"{model_type(dict(cfg))!r} and this config.json; pass the matching --hf-config")
    prog = Progress("mcore-to-hf", len(state), sum(prod(t.shape) * t.element_size() for t in state.values()),
                    enabled=progress)
    writer = HFWriter(tmp, max_shard_bytes)
    for name in owners:  # rule order: the HF order of the maps
        full = state[name]
        for rule in (owners[name], *copies.get(name, ())):
            for hf_name, t in maps.apply_mcore_to_hf(rule, {name: full}.__getitem__):
                writer.add(hf_name, t)
        prog.update(full.numel() * full.element_size())
    writer.close()
    prog.close()


def check_layout_flags(flags: Mapping[str, object]) -> None:
    """ValueError when a layout flag is set with ``--format torch_dist`` (it is reshardable at load);
    NotImplementedError for the flags this path does not implement (``--noop-layers``, ``--progress``)."""
    for name in UNIMPLEMENTED_FLAGS:
        if flags.get(name):
            flag = "--" + name.replace("_", "-")
            raise NotImplementedError(f"{flag} is not implemented for --format torch_dist; drop it or use --format legacy")
    for name, default in LAYOUT_FLAGS.items():
        value = flags.get(name, default)
        if value != default:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {value} does not apply to --format torch_dist: megatron reshards it at load to any "
                             f"TP/PP/EP; drop {flag} (or use --format legacy)")


def run_cli(args) -> int:
    """``mindspeed convert hf-to-mcore --format torch_dist``."""
    check_layout_flags(vars(args))
    out = hf_to_torch_dist(args.hf_dir, args.out, dtype=args.dtype,
                           make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, overwrite=args.overwrite)
    print(f"wrote Megatron torch_dist checkpoint (world size 1, reshardable at load) to {out}")
    return 0

