"""Streaming conversion between HF safetensors directories and Megatron legacy checkpoints.

``hf_to_mcore`` writes one rank file at a time: for each (stage, TP rank) it walks that
stage's rules, pulls the HF tensors lazily, builds the full megatron tensor and keeps only the
rank's shard, so memory holds one rank file plus one full tensor. ``mcore_to_hf`` maps one
stage's rank files (``torch.load(mmap=True)``), merges each tensor's shards, and streams HF
tensors into size-bounded shards. Both write into a temporary sibling of ``out`` and rename
it into place at the end, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mindspeed_ckpt import maps
from mindspeed_ckpt.hf_io import CONFIG, DEFAULT_SHARD_BYTES, HFReader, HFWriter, copy_side_files, read_json
from mindspeed_ckpt.maps.config import model_type
from mindspeed_ckpt.megatron_io import args_get, locate, save_rank, write_tracker
from mindspeed_ckpt.sharding import EMBEDDING, OUTPUT, Stages, check_tp, merge_tp, padded_vocab_size, split_tp

DTYPES: Mapping[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DENSE = ("llama", "qwen2", "qwen3")
HF_CONFIG_DIR = "hf_config"  # where hf_to_mcore keeps config.json and tokenizer files inside the megatron dir
ITERATION = 1


def _supported(cfg: Mapping[str, Any], where: Path) -> None:
    mt = model_type(cfg)
    maps.architecture(mt)  # unknown model types: the maps' own message
    if mt not in DENSE:
        raise NotImplementedError(f"{where}: model_type {mt!r} (MoE/MLA) is not supported by mindspeed convert yet; "
                                  f"supported: {', '.join(DENSE)}")


@contextmanager
def staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling directory of ``out``, renamed to ``out`` when the block succeeds
    and removed when it fails. Refuses an existing ``out`` unless ``overwrite``."""
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _rope_theta(cfg: Mapping[str, Any]) -> Any:
    params = cfg.get("rope_parameters")
    return cfg.get("rope_theta") or (params.get("rope_theta") if isinstance(params, Mapping) else None)


def megatron_args(cfg: Mapping[str, Any], lay: maps.Layout, tp: int, pp: int, padded: int, dtype: torch.dtype,
                  divisible_by: int) -> argparse.Namespace:
    """The args megatron's loader and our reader consult, from the HF config."""
    d, f = lay.dims, lay.features
    return argparse.Namespace(
        num_layers=lay.num_layers, hidden_size=d["hidden"], ffn_hidden_size=d["ffn"], num_attention_heads=d["heads"],
        num_query_groups=d["groups"], group_query_attention=d["groups"] != d["heads"], kv_channels=d["head_dim"],
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=1, vocab_size=d["vocab"], padded_vocab_size=padded,
        make_vocab_size_divisible_by=divisible_by, max_position_embeddings=cfg.get("max_position_embeddings"),
        untie_embeddings_and_output_weights="untied" in f, add_qkv_bias="qkv_bias" in f,
        add_bias_linear="proj_bias" in f, qk_layernorm="qk_norm" in f, normalization="RMSNorm",
        norm_epsilon=cfg.get("rms_norm_eps"), swiglu=True, position_embedding_type="rope",
        add_position_embedding=False, rotary_base=_rope_theta(cfg),
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        consumed_train_samples=0, consumed_valid_samples=0, iteration=ITERATION, hf_model_type=model_type(cfg),
    )


def _check_hf_names(reader: HFReader, rule_list: list[maps.Rule]) -> None:
    have = set(reader.names)
    for rule in rule_list:
        for name in rule.hf:
            if name not in have and not rule.optional:
                raise ValueError(f"{reader.dir}: missing tensor {name!r} (needed for megatron {rule.mcore!r})")
    known = {n for r in rule_list for n in r.hf}
    ignored = maps.ignored_hf(reader.config)
    extra = sorted(n for n in have if n not in known and not ignored(n))
    if extra:
        raise ValueError(f"{reader.dir}: unexpected tensor {extra[0]!r} ({len(extra)} in all) for model_type "
                         f"{reader.config['model_type']!r}; check that config.json matches the weights")


def _check_aliases(reader: HFReader, rule_list: list[maps.Rule]) -> None:
    owners = {r.mcore: r for r in rule_list if not r.alias}
    for rule in rule_list:
        if rule.alias and all(n in reader.names for n in rule.hf):
            _, dup = maps.apply_hf_to_mcore(rule, reader.get)
            _, orig = maps.apply_hf_to_mcore(owners[rule.mcore], reader.get)
            if not torch.equal(dup, orig):
                raise ValueError(f"{reader.dir}: tensor {rule.hf[0]!r} differs from the tensor megatron shares it with "
                                 f"({rule.mcore!r}); megatron keeps one copy")


def placements(rule_list: list[maps.Rule], stages: Stages, tied: bool) -> list[list[tuple[maps.Rule, str]]]:
    """Per pipeline stage, the (rule, local megatron name) pairs its rank files hold. With tied
    embeddings and PP > 1 the last stage keeps its own ``output_layer.weight`` copy, as
    megatron-core allocates one there."""
    out: list[list[tuple[maps.Rule, str]]] = [[] for _ in range(stages.pp)]
    for rule in rule_list:
        if rule.alias:
            continue
        stage, local = stages.place(rule.mcore)
        out[stage].append((rule, local))
        if tied and stages.pp > 1 and rule.mcore == EMBEDDING:
            out[-1].append((rule, OUTPUT))
    return out


def hf_to_mcore(hf_dir: str | os.PathLike, out: str | os.PathLike, *, tp: int = 1, pp: int = 1, dtype: str | None = None,
                make_vocab_size_divisible_by: int = 128, overwrite: bool = False) -> Path:
    """Convert an HF directory into a Megatron legacy checkpoint at ``out`` (TP x PP rank
    files, iteration 1) plus ``out/hf_config/`` (config and tokenizer files). ``dtype``: one of
    ``DTYPES`` (default: keep the HF dtype). Raises ValueError for bad input,
    NotImplementedError for architectures not handled yet."""
    reader = HFReader(hf_dir)
    cfg = reader.config
    _supported(cfg, reader.dir / CONFIG)
    lay = maps.layout(cfg)
    if ("proj_bias" in lay.features) != ("mlp_bias" in lay.features):
        # megatron has one switch (add_bias_linear) for the attention output and MLP biases
        raise NotImplementedError(f"{reader.dir / CONFIG}: attention_bias and mlp_bias differ; megatron's add_bias_linear "
                                  "covers both, so they must agree")
    check_tp(dict(lay.dims), tp)
    stages = Stages(lay.num_layers, pp)
    padded = padded_vocab_size(lay.dims["vocab"], make_vocab_size_divisible_by, tp)
    rule_list = maps.rules(cfg, padded_vocab_size=padded)
    _check_hf_names(reader, rule_list)
    _check_aliases(reader, rule_list)
    cast = DTYPES[dtype] if dtype is not None else None
    out_dtype = cast or reader.get(rule_list[0].hf[0]).dtype
    args = megatron_args(cfg, lay, tp, pp, padded, out_dtype, make_vocab_size_divisible_by)
    plan = placements(rule_list, stages, "tied" in lay.features)
    with staging(Path(out), overwrite) as tmp:
        for stage, items in enumerate(plan):
            for rank in range(tp):
                sd = {}
                for rule, local in items:
                    _, full = maps.apply_hf_to_mcore(rule, reader.get)
                    sd[local] = split_tp(local, full if cast is None else full.to(cast), tp, rank)
                    del full
                save_rank(tmp, ITERATION, rank, stage, pp, sd, args)
                del sd
        write_tracker(tmp, ITERATION)
        copy_side_files(reader.dir, tmp / HF_CONFIG_DIR)
    return Path(out)


def _stage_tensors(ck, stage: int, expected: set[str]) -> list[Mapping[str, torch.Tensor]]:
    files = []
    for rank in range(ck.tp):
        sd = ck.load(rank, stage)["model"]
        keys = {k for k in sd if not k.endswith("._extra_state")}
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        if missing or extra:
            what = f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
            raise ValueError(f"{ck.path(rank, stage)}: {what} for this config.json with PP={ck.pp}")
        files.append(sd)
    return files


def _check_grid(ck, args: Any) -> None:
    for key, found in (("tensor_model_parallel_size", ck.tp), ("pipeline_model_parallel_size", ck.pp)):
        saved = args_get(args, key)
        if saved is not None and saved != found:
            raise ValueError(f"{ck.path(0, 0)}: args.{key}={saved} but the rank directories say {found}")


def mcore_to_hf(mcore_dir: str | os.PathLike, out: str | os.PathLike, *, hf_config: str | os.PathLike | None = None,
                overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Convert a Megatron legacy checkpoint (any TP x PP) into an HF directory at ``out``:
    the config and tokenizer files of ``hf_config`` (default ``mcore_dir/hf_config``) plus
    safetensors shards of at most ``max_shard_bytes`` (with an index when more than one)."""
    ck = locate(mcore_dir)
    _check_grid(ck, ck.load(0, 0).get("args"))
    cfg_dir = Path(hf_config) if hf_config is not None else ck.root / HF_CONFIG_DIR
    if not (cfg_dir / CONFIG).is_file():
        raise ValueError(f"{cfg_dir / CONFIG}: file not found; pass --hf-config DIR holding the model's config.json")
    cfg = read_json(cfg_dir / CONFIG)
    _supported(cfg, cfg_dir / CONFIG)
    lay = maps.layout(cfg)
    stages = Stages(lay.num_layers, ck.pp)
    emb = ck.load(0, 0)["model"].get(EMBEDDING)
    if not isinstance(emb, torch.Tensor):
        raise ValueError(f"{ck.path(0, 0)}: missing tensor {EMBEDDING!r}")
    rule_list = maps.rules(cfg, padded_vocab_size=emb.shape[0] * ck.tp)
    plan = placements(rule_list, stages, "tied" in lay.features)
    with staging(Path(out), overwrite) as tmp:
        writer = HFWriter(tmp, max_shard_bytes)
        for stage, items in enumerate(plan):
            files = _stage_tensors(ck, stage, {local for _, local in items})
            for rule, local in items:
                if rule.mcore != stages.global_name(stage, local):
                    continue  # the last stage's copy of a tied embedding
                full = merge_tp(local, [f[local] for f in files])
                for name, t in maps.apply_mcore_to_hf(rule, {rule.mcore: full}.__getitem__):
                    writer.add(name, t)
            del files
        writer.close()
        copy_side_files(cfg_dir, tmp)
    return Path(out)
