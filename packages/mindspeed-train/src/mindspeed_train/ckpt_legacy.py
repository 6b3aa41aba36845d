"""Megatron's legacy checkpoint format (``--ckpt-format torch``): one ``torch.save`` file per model-parallel rank.

Layout (megatron's naming)::

    SAVE/iter_0000042/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt   TT = TP rank, _PPP when PP > 1, _EEE when EP > 1
    SAVE/iter_0000042/mp_rank_.../distrib_optim.pt                 the distributed optimizer's parameter state
    SAVE/latest_checkpointed_iteration.txt, SAVE/hf_config/config.json

Only the first replica of each (TP, PP, EP) rank writes (expert-data-parallel rank 0, which for a dense
model is data-parallel rank 0); the other DP ranks read the same file. ``model_optim_rng.pt`` holds:
``model`` (the GPTModel's own state dict, local layer and expert numbering, as megatron saves it),
``iteration``, ``checkpoint_version`` 3.0, ``args`` (an ``argparse.Namespace`` with megatron's names:
parallel sizes, model sizes, ``consumed_train_samples`` ...), ``optimizer`` (megatron's optimizer
``state_dict()``), ``opt_param_scheduler``, ``rng_state`` (one dict per DP rank, megatron's keys) and our
``consumed_samples``. With the distributed optimizer the Adam moments and fp32 main parameters go to
``distrib_optim.pt`` through megatron's own ``save_parameter_state`` (gathered to DP rank 0 over gloo).

Every file loads with ``torch.load(weights_only=True)`` (plus ``argparse.Namespace``, as
``mindspeed convert mcore-to-hf`` reads it): the numpy RNG key array is kept as a torch tensor, the one
departure from megatron's pickle. The staging directory, commit and pruning are :mod:`mindspeed_train.ckpt`'s.
"""

from __future__ import annotations

import argparse
import os
import random
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mindspeed_train.config import CheckpointSettings
from mindspeed_train.optim import inner_optimizers

FILE = "model_optim_rng.pt"
DISTRIB_OPTIM = "distrib_optim.pt"
CHECKPOINT_VERSION = 3.0


def is_legacy(path: str) -> bool:
    """Whether the iteration directory ``path`` holds legacy ``mp_rank_*`` rank directories."""
    return os.path.isdir(path) and any(name.startswith("mp_rank_") for name in os.listdir(path))


def rank_dir(step_dir: str) -> str:
    """This rank's ``mp_rank_TT[_PPP][_EEE]`` directory inside ``step_dir`` (megatron's naming)."""
    from megatron.core import parallel_state as ps

    from mindspeed_ckpt.plan import rank_dir as name

    pp, ep = ps.get_pipeline_model_parallel_world_size(), ps.get_expert_model_parallel_world_size()
    return os.path.join(step_dir, name(ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), pp,
                                       ps.get_expert_model_parallel_rank(), ep))  # fmt: skip


def _is_writer() -> bool:
    # megatron's rule for the legacy format: one copy per (TP, PP, EP) rank, from the first expert-DP replica.
    from megatron.core import parallel_state as ps

    return ps.get_expert_data_parallel_rank() == 0


def _gpt(model):
    """The GPTModel inside megatron's DDP (and Float16Module with --bf16)."""
    inner = model.module
    return getattr(inner, "module", inner)


def _rng_states() -> list[dict[str, Any]]:
    """Every DP rank's RNG states (collective over DP), with megatron's key names."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    name, keys, pos, has_gauss, cached = np.random.get_state()
    mine = {"random_rng_state": random.getstate(),
            # the key array as a tensor (megatron pickles the ndarray): the file stays weights_only-loadable
            "np_rng_state": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": get_cuda_rng_tracker().get_states()}  # fmt: skip
    states: list[Any] = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(states, mine, group=ps.get_data_parallel_group())
    return states


def _restore_rng(states: list[dict[str, Any]], where: str) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    dp = ps.get_data_parallel_rank()
    if dp >= len(states):
        raise ValueError(f"--load {where}: rng_state holds {len(states)} DP ranks, this job has more; pass --no-load-rng")
    mine = states[dp]
    random.setstate(mine["random_rng_state"])
    name, keys, pos, has_gauss, cached = mine["np_rng_state"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(mine["torch_rng_state"])
    get_cuda_rng_tracker().set_states(mine["rng_tracker_states"])


def _args(model, *, iteration: int, consumed_samples: int, distributed_optimizer: bool) -> argparse.Namespace:
    """megatron's saved ``args`` (the fields its loader and ``mindspeed convert`` read)."""
    from megatron.core import parallel_state as ps

    gpt = _gpt(model)
    cfg = gpt.config
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups, kv_channels=cfg.kv_channels,
        max_position_embeddings=gpt.max_position_embeddings, padded_vocab_size=gpt.vocab_size,
        num_experts=cfg.num_moe_experts, tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        data_parallel_size=ps.get_data_parallel_world_size(), world_size=dist.get_world_size(),
        params_dtype=cfg.params_dtype, bf16=cfg.bf16, fp16=cfg.fp16, use_distributed_optimizer=distributed_optimizer,
        ckpt_format="torch", iteration=iteration, consumed_train_samples=consumed_samples, consumed_valid_samples=0,
    )  # fmt: skip


def _uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(part, DistributedOptimizer) for part in getattr(optimizer, "chained_optimizers", [optimizer]))


def save(step_dir: str, settings: CheckpointSettings, model, optimizer, scheduler, *, iteration: int,
         consumed_samples: int) -> None:
    """Write this rank's share of the legacy checkpoint into ``step_dir`` (collective: every rank
    calls it; the RNG gather and the distributed optimizer's gather run over DP)."""
    distributed = _uses_distributed_optimizer(optimizer)
    rng = _rng_states() if settings.save_rng else None
    directory = rank_dir(step_dir)
    if _is_writer():
        os.makedirs(directory, exist_ok=True)
    dist.barrier()  # the directory exists before the distributed optimizer's DP rank 0 writes into it
    if settings.save_optim and distributed:
        optimizer.save_parameter_state(os.path.join(directory, DISTRIB_OPTIM))
    if not _is_writer():
        return
    state: dict[str, Any] = {
        "args": _args(model, iteration=iteration, consumed_samples=consumed_samples, distributed_optimizer=distributed),
        "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, "consumed_samples": consumed_samples,
        "model": _gpt(model).state_dict_for_save_checkpoint(),
    }  # fmt: skip
    if settings.save_optim:
        state["optimizer"] = optimizer.state_dict()
        state["opt_param_scheduler"] = scheduler.state_dict()
    if rng is not None:
        state["rng_state"] = rng
    torch.save(state, os.path.join(directory, FILE))


def read(step_dir: str) -> tuple[str, dict[str, Any]]:
    """(this rank's directory, its ``model_optim_rng.pt``); ValueError when the checkpoint was saved
    with another parallel layout or the file is unreadable."""
    directory = rank_dir(step_dir)
    path = os.path.join(directory, FILE)
    if not os.path.isfile(path):
        found = sorted(n for n in os.listdir(step_dir) if n.startswith("mp_rank_"))
        raise ValueError(f"--load: {path} is missing (the checkpoint holds {', '.join(found)}): it was saved with another "
                         "TP/PP/EP layout; match it or convert with `mindspeed convert reshard`")  # fmt: skip
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"--load: {path} is not a readable megatron checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None  # fmt: skip
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"--load: {path} has no 'model' state dict (VPP checkpoints are not supported by mindspeed train)")
    return directory, state


def _load_model(model, state: dict[str, Any], where: str) -> None:
    """Load the saved model state strictly, except that ``_extra_state`` entries may be absent
    (``mindspeed convert hf-to-mcore`` writes none)."""
    result = _gpt(model).load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ValueError(f"--load {where}: the model state does not fit this model ({what}); check --model")


def _check_layout(args: Any, where: str) -> None:
    from megatron.core import parallel_state as ps

    ours = {"tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
            "expert_model_parallel_size": ps.get_expert_model_parallel_world_size()}  # fmt: skip
    for key, value in ours.items():
        saved = getattr(args, key, None) if args is not None else None
        if saved is not None and saved != value:
            raise ValueError(f"--load {where}: saved with {key}={saved}, this job has {value}; match it or convert with "
                             "`mindspeed convert reshard`")  # fmt: skip


def load(step_dir: str, settings: CheckpointSettings, model, optimizer, scheduler) -> tuple[int, int]:
    """Restore from the legacy checkpoint ``step_dir`` (collective with the distributed optimizer);
    returns (iteration, consumed samples), both 0 with ``--finetune``."""
    directory, state = read(step_dir)
    _check_layout(state.get("args"), step_dir)
    # shapes are checked by load_state_dict: a mismatch there names the tensor
    try:
        _load_model(model, state["model"], step_dir)
    except RuntimeError as exc:
        raise ValueError(f"--load {step_dir}: {str(exc).splitlines()[0]}; check --model and the parallel layout") from None
    with_optim = settings.load_optim and not settings.finetune
    if with_optim:
        _load_optimizer(directory, state, optimizer, scheduler)
    else:
        with torch.no_grad():  # main (fp32) parameters of a bf16 model follow the loaded weights, as in megatron
            optimizer.reload_model_params()
    if settings.finetune:
        return 0, 0
    if settings.load_rng:
        if "rng_state" not in state:
            raise ValueError(f"--load {directory}: no rng_state in {FILE}; pass --no-load-rng (or --finetune)")
        _restore_rng(state["rng_state"], directory)
    args = state.get("args")
    consumed = state.get("consumed_samples", getattr(args, "consumed_train_samples", 0) if args is not None else 0)
    return int(state.get("iteration", 0)), int(consumed)


@contextmanager
def _steps_set_aside(optimizer):
    """Take torch Adam's per-parameter ``step`` out of the inner optimizers' states for the block.

    megatron's ``load_parameter_state_from_dp_zero`` copies every entry of a parameter's state from
    the file, which (written for Apex/TE Adam) holds only param/exp_avg/exp_avg_sq: torch Adam's
    ``step`` would be a KeyError. The step itself comes from ``optimizer.load_state_dict`` before, as
    one tensor shared by every parameter: each gets its own copy back, or torch's foreach Adam would
    add 1 to the shared tensor once per parameter."""
    parts = inner_optimizers(optimizer)
    steps = [{param: state.pop("step") for param, state in inner.state.items() if "step" in state} for inner in parts]
    try:
        yield
    finally:
        for inner, saved in zip(parts, steps, strict=True):
            for param, step in saved.items():
                inner.state[param]["step"] = step.clone()


def _load_optimizer(directory: str, state: dict[str, Any], optimizer, scheduler) -> None:
    if "optimizer" not in state:
        raise ValueError(f"--load {directory}: no optimizer state in {FILE} (a converted or --no-save-optim checkpoint); "
                         "pass --finetune or --no-load-optim")  # fmt: skip
    # no_grad: with fp32 parameters the distributed optimizer's main shards are views of the model's
    # (autograd leaf) parameters, and megatron copies the loaded values into them in place.
    with torch.no_grad():
        optimizer.load_state_dict(state["optimizer"])
        if _uses_distributed_optimizer(optimizer):
            path = os.path.join(directory, DISTRIB_OPTIM)
            exists = torch.tensor([int(os.path.isfile(path))])
            dist.all_reduce(exists, op=dist.ReduceOp.MIN)
            if not exists.item():
                raise ValueError(f"--load {directory}: {DISTRIB_OPTIM} is missing (saved without the distributed "
                                 "optimizer?); pass --no-load-optim")  # fmt: skip
            with _steps_set_aside(optimizer):
                optimizer.load_parameter_state(path)
    if "opt_param_scheduler" in state:
        scheduler.load_state_dict(state["opt_param_scheduler"])
