"""Megatron legacy checkpoint -> Megatron legacy checkpoint with another parallel layout.

::

    reshard("ckpt_tp2pp2/", "ckpt_tp1pp4/", tp=1, pp=4)

The input (any TP x PP x VPP x EP, uneven PP, read by :func:`mindspeed_ckpt.read_mcore`) is
read tensor by tensor through :meth:`McoreCheckpoint.get`, which maps only the rank files of
the stage that owns the tensor; the output is written by the same stage writer as
``hf_to_mcore`` (:func:`mindspeed_ckpt.convert.write_stage`), one rank file at a time. So
memory holds one output rank file, one full tensor and the pages of the mapped input stage.
The vocabulary padding is redone for the new TP size (padding rows past the old padding are
zero); tensors keep their dtype unless ``dtype`` is given, so a reshard and back is
bit-identical.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from math import prod
from pathlib import Path

import torch

from mindspeed_ckpt import maps
from mindspeed_ckpt.convert import DTYPES, write_stage
from mindspeed_ckpt.hf_io import copy_side_files
from mindspeed_ckpt.lora import is_lora_key
from mindspeed_ckpt.mcore_args import ITERATION, megatron_args
from mindspeed_ckpt.megatron_io import args_get, write_tracker
from mindspeed_ckpt.placement import EMBEDDING
from mindspeed_ckpt.plan import placements, plan_output, staging
from mindspeed_ckpt.progress import Progress
from mindspeed_ckpt.reader import HF_CONFIG_DIR, McoreCheckpoint, read_mcore
from mindspeed_ckpt.sharding import tp_dim


def _check_names(ck: McoreCheckpoint, rule_list: list[maps.Rule]) -> None:
    """Refuse an input whose tensors are not exactly the ones the config's rules expect."""
    want = {r.mcore for r in rule_list if not r.alias}
    have = ck.names()
    extra = [n for n in have if n not in want]
    if extra:
        hint = ("; merge LoRA adapters on export (mcore-to-hf --lora-dir) instead" if is_lora_key(extra[0])
                else "; pass the matching --hf-config")
        raise ValueError(f"{ck.legacy.step_dir}: unexpected tensor {extra[0]!r} ({len(extra)} in all) for model_type "
                         f"{ck.hf_config['model_type']!r} and this config.json{hint}")
    missing = sorted(want.difference(have))
    if missing:
        raise ValueError(f"{ck.legacy.step_dir}: missing tensor {missing[0]!r} ({len(missing)} missing in all) for "
                         f"this config.json with TP={ck.tp} PP={ck.pp} VPP={ck.vpp} EP={ck.ep}")


def _source(ck: McoreCheckpoint):
    """``rule -> full megatron tensor`` read from ``ck``, vocabulary rows re-padded to the rule's shape."""

    def get(rule: maps.Rule) -> torch.Tensor:
        t = ck.get(rule.mcore)
        want = tuple(rule.mcore_shape)
        if tuple(t.shape) == want:
            return t
        if rule.transform == "vocab" and tuple(t.shape[1:]) == want[1:]:
            # megatron pads the vocabulary to a multiple of (divisible_by * TP): rows past the
            # real vocabulary are padding, dropped or zero-filled for the new TP size
            out = t.new_zeros(want)
            n = min(t.shape[0], want[0])
            out[:n] = t[:n]
            return out
        raise ValueError(f"{ck.legacy.step_dir}: tensor {rule.mcore!r} has shape {tuple(t.shape)} but config.json "
                         f"implies {want}; pass the matching --hf-config")

    return get


def reshard(mcore_dir: str | os.PathLike, out: str | os.PathLike, *, tp: int = 1, pp: int = 1, ep: int = 1, vpp: int = 1,
            num_layer_list: str | Sequence[int] | None = None, decoder_first_pipeline_num_layers: int | None = None,
            decoder_last_pipeline_num_layers: int | None = None, noop_layers: str | Sequence[int] | None = None,
                dtype: str | None = None,
            make_vocab_size_divisible_by: int | None = None, hf_config: str | os.PathLike | None = None,
            overwrite: bool = False, progress: bool | None = None) -> Path:
    """Rewrite the legacy checkpoint ``mcore_dir`` at ``out`` with TP ``tp``, PP ``pp`` (layer
    split by ``num_layer_list`` or ``decoder_first/last_pipeline_num_layers``, default even),
    VPP ``vpp`` and EP ``ep`` (expert TP 1), same flags and output as ``hf_to_mcore``
    (``out/hf_config/`` copied from the input's config directory, or ``hf_config``).

    dtype: one of ``DTYPES`` (default: keep). make_vocab_size_divisible_by: default the input's
    saved value (else 128). Raises ValueError (one line, naming the flag or file) for bad input.
    """
    src, dst = Path(mcore_dir), Path(out)
    if src.resolve() == dst.resolve():
        raise ValueError(f"--out {dst} is the input --mcore-dir; write the resharded checkpoint to another directory")
    ck = read_mcore(src, hf_config)
    cfg, lay = ck.hf_config, ck.layout
    divisible_by = make_vocab_size_divisible_by or args_get(ck.args, "make_vocab_size_divisible_by") or 128
    out_plan = plan_output(cfg, lay, tp=tp, pp=pp, vpp=vpp, ep=ep, num_layer_list=num_layer_list,
                           first=decoder_first_pipeline_num_layers, last=decoder_last_pipeline_num_layers,
                           noop_layers=noop_layers, divisible_by=divisible_by)
    grid, padded, rule_list = out_plan.grid, out_plan.padded, out_plan.rules
    _check_names(ck, rule_list)
    cast = DTYPES[dtype] if dtype is not None else None
    out_dtype = cast or ck.get(EMBEDDING).dtype
    args = megatron_args(cfg, lay, tp=tp, grid=grid, padded=padded, dtype=out_dtype, divisible_by=divisible_by,
                         first=out_plan.first, last=out_plan.last, layer_list=out_plan.layer_list)
    plan = placements(rule_list, grid)
    per_file = [(r, s) for items in plan for e in range(ep) for r, s in items if s.ep_rank in (None, e)]
    nbytes = sum(prod(r.mcore_shape) * out_dtype.itemsize // (tp if tp_dim(s.local) is not None else 1) for r, s in per_file)
    prog = Progress("reshard", tp * len(per_file), tp * nbytes, enabled=progress)
    source = _source(ck)
    with staging(dst, overwrite) as tmp:
        for stage, items in enumerate(plan):
            write_stage(tmp, stage, items, source, tp=tp, grid=grid, cast=cast, args=args, prog=prog)
        write_tracker(tmp, ITERATION)
        copy_side_files(ck.config_dir, tmp / HF_CONFIG_DIR)
    prog.close()
    return dst
