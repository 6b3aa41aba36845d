"""Checkpoints of a training run: torch_dist through megatron-core's ``dist_checkpointing`` (default),
or megatron's legacy per-rank files with ``--ckpt-format torch`` (:mod:`mindspeed_train.ckpt_legacy`).

Layout (megatron's): ``SAVE/iter_0000042/`` (the dist checkpoint) and
``SAVE/latest_checkpointed_iteration.txt``. A checkpoint is written to ``iter_0000042.tmp`` and
renamed only after every rank finished writing; the tracker file is replaced after that. A save
killed half-way therefore leaves only a ``.tmp`` directory that nothing ever loads.

Saved: model, optimizer (unless ``--no-save-optim``), LR scheduler, iteration, consumed samples
(the data position) and every rank's RNG states (unless ``--no-save-rng``). The HF config goes to
``SAVE/hf_config/config.json`` so that ``mindspeed_models.load_pretrained(SAVE)`` can rebuild the model.
With ``save_total_limit`` N, older ``iter_*`` directories beyond the newest N are deleted, only after
the new checkpoint is committed (the tracker already names it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mindspeed_train.config import CheckpointSettings
from mindspeed_train.optim import inner_optimizers, set_step_tensor

TRACKER = "latest_checkpointed_iteration.txt"
# megatron-core 0.16's default layout for the distributed optimizer's state: one ShardedTensor per
# gradient buffer, written and read by every rank without gathering (reshardable over DP only).
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass(frozen=True)
class Loaded:
    """What a resume restores besides the tensors: where training continues."""

    iteration: int
    consumed_samples: int


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int | None:
    """The iteration the tracker file names, or None when ``root`` holds no committed checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"--load {root}: {TRACKER} holds {text!r}, not an iteration number; fix or delete it")
    return int(text)


def _rng_object(is_loading: bool):
    """Every DP rank's RNG states as one ShardedObject per (PP, TP) rank, as megatron stores them."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    states = None
    if not is_loading:
        mine = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "tracker": get_cuda_rng_tracker().get_states()}  # fmt: skip
        states = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(states, mine, group=ps.get_data_parallel_group())
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    return ShardedObject("rng_state", states, shape, offset, replica_id=ps.get_data_parallel_rank())


def _restore_rng(states: list[dict[str, Any]]) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    mine = states[ps.get_data_parallel_rank()]
    random.setstate(mine["random"])
    np.random.set_state(mine["numpy"])
    torch.set_rng_state(mine["torch"])
    get_cuda_rng_tracker().set_states(mine["tracker"])


def _init_adam_state(optimizer) -> None:
    """Give every parameter of the torch Adam(s) inside ``optimizer`` an all-zero state (step 0).

    Without Apex/TransformerEngine, megatron's DistributedOptimizer.state_dict() reads each state's
    ``step``, which torch creates only at the first step; a fresh job resuming would fail there.
    The zeros are placeholders: loading overwrites them in place. Parameters are not touched."""
    for inner in inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                          "exp_avg_sq": torch.zeros_like(param)}  # fmt: skip


def _adam_step(optimizer) -> float | None:
    """The step count of the torch Adam(s) inside ``optimizer`` (None before the first step)."""
    steps = {float(state["step"]) for inner in inner_optimizers(optimizer)
             for state in inner.state.values() if "step" in state}  # fmt: skip
    if len(steps) > 1:
        raise RuntimeError(f"optimizer states disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else None


def _set_adam_step(optimizer, step: float) -> None:
    # megatron's sharded optimizer state keeps Adam's per-parameter ``step`` as a plain value of the
    # load template (not a sharded tensor), so the loaded states carry the template's placeholder;
    # the step saved in the common state is put back here.
    for inner in inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                if param in inner.state:
                    inner.state[param]["step"] = set_step_tensor(step, param, fused=bool(group.get("fused")))


def _model_keys(chunks: list) -> list[str]:
    """megatron's names for the model entries: ``model``, or ``model0, model1, ...`` per virtual stage."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _sharded_state(chunks: list, optimizer, *, with_optim: bool, with_rng: bool, is_loading: bool) -> dict[str, Any]:
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    keys = _model_keys(chunks)
    # megatron 0.16's GPTModel subscripts ``metadata`` (None by default) on a pipeline stage that
    # holds MTP but not the embedding: pass megatron's default (the DP x CP group) explicitly.
    state: dict[str, Any] = {
        key: chunk.module.sharded_state_dict(metadata=ensure_metadata_has_dp_cp_group(None))
        for key, chunk in zip(keys, chunks, strict=True)
    }
    if with_optim and is_loading:
        _init_adam_state(optimizer)
    if with_optim:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading, metadata=OPTIM_METADATA)
    if with_rng:
        state["rng_state"] = _rng_object(is_loading)
    return state


def _commit(tmp: str, final: str, root: str, iteration: int) -> None:
    """Rank 0: make the finished checkpoint visible (rename, then point the tracker at it)."""
    os.replace(tmp, final)
    tracker_tmp = os.path.join(root, f"{TRACKER}.tmp")
    with open(tracker_tmp, "w") as handle:
        handle.write(str(iteration))
    os.replace(tracker_tmp, os.path.join(root, TRACKER))


def _committed_iterations(root: str) -> list[int]:
    """Iterations of the committed ``iter_NNNNNNN`` directories under ``root`` (no ``.tmp``), ascending."""
    found = []
    for name in os.listdir(root):
        digits = name[len("iter_"):]
        if name.startswith("iter_") and digits.isdigit() and os.path.isdir(os.path.join(root, name)):
            found.append(int(digits))
    return sorted(found)


def prune_checkpoints(root: str, keep: int, current: int) -> list[str]:
    """Keep ``current`` (the checkpoint the tracker names) and the newest ``keep - 1`` other committed
    checkpoints under ``root``; delete the rest (also newer ones left by a run this one resumed
    before: the tracker no longer names them). Returns the deleted paths."""
    if keep < 1:
        raise ValueError(f"--save-total-limit {keep}: keep at least 1 checkpoint")
    others = [it for it in reversed(_committed_iterations(root)) if it != current]
    doomed = [iter_dir(root, it) for it in others[keep - 1:]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


# Files of a Hugging Face tokenizer directory (fast and slow tokenizers, chat template).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt",
                   "tokenizer.model", "spiece.model")  # fmt: skip


def _stage(root: str, tmp: str, hf_config: dict[str, Any], tokenizer: str | None = None) -> None:
    """Rank 0: a fresh staging directory and ``SAVE/hf_config/`` (config.json, plus the tokenizer's
    files when ``tokenizer`` names a directory, so an export carries them); then every rank waits."""
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier, interrupted save
        os.makedirs(tmp)
        target = os.path.join(root, "hf_config")
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(target, "config.json"), "w") as handle:
            json.dump(hf_config, handle, indent=2)
        for name in TOKENIZER_FILES if tokenizer and os.path.isdir(tokenizer) else ():
            if os.path.isfile(os.path.join(tokenizer, name)):
                shutil.copyfile(os.path.join(tokenizer, name), os.path.join(target, name))
    dist.barrier()


def _publish(settings: CheckpointSettings, tmp: str, final: str, iteration: int) -> None:
    """After every rank wrote its share into ``tmp``: rank 0 renames it to ``final``, moves the
    tracker and prunes (``--save-total-limit``)."""
    dist.barrier()  # every rank's shards are on disk before the checkpoint becomes visible
    if dist.get_rank() == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        _commit(tmp, final, settings.save, iteration)
        if settings.save_total_limit:
            prune_checkpoints(settings.save, settings.save_total_limit, iteration)
    dist.barrier()


def _save_torch_dist(tmp: str, settings: CheckpointSettings, chunks, optimizer, scheduler, *, iteration: int,
                     consumed_samples: int) -> None:
    from megatron.core import dist_checkpointing

    state = _sharded_state(chunks, optimizer, with_optim=settings.save_optim, with_rng=settings.save_rng, is_loading=False)
    state.update(iteration=iteration, consumed_samples=consumed_samples, checkpoint_version=3.0,
                 opt_param_scheduler=scheduler.state_dict(), adam_step=_adam_step(optimizer))  # fmt: skip
    dist_checkpointing.save(state, tmp)


def _single(chunks: list):
    if len(chunks) != 1:
        raise ValueError("legacy checkpoints (--ckpt-format torch) with virtual pipeline stages are not implemented; "
                         "use --ckpt-format torch_dist")  # fmt: skip
    return chunks[0]


def save_checkpoint(settings: CheckpointSettings, chunks, optimizer, scheduler, *, iteration: int,
                    consumed_samples: int, hf_config: dict[str, Any], tokenizer: str | None = None) -> str:
    """Write ``SAVE/iter_N`` of the DDP-wrapped model ``chunks`` (one per virtual pipeline stage; megatron's
    ``model`` or ``model0, model1, ...`` entries) on all ranks (collective) in ``settings.format``: ``torch_dist`` here,
    ``torch`` (megatron's legacy per-rank files) in :mod:`mindspeed_train.ckpt_legacy`. Returns its path."""
    final = iter_dir(settings.save, iteration)
    tmp = final + ".tmp"
    _stage(settings.save, tmp, hf_config, tokenizer)
    if settings.format == "torch":
        from mindspeed_train import ckpt_legacy

        ckpt_legacy.save(tmp, settings, _single(chunks), optimizer, scheduler, iteration=iteration,
                         consumed_samples=consumed_samples)
    else:
        _save_torch_dist(tmp, settings, chunks, optimizer, scheduler, iteration=iteration, consumed_samples=consumed_samples)
    _publish(settings, tmp, final, iteration)
    return final


def load_checkpoint(settings: CheckpointSettings, chunks, optimizer, scheduler) -> Loaded | None:
    """Restore from ``LOAD``'s latest committed checkpoint; None when there is none (fresh start).
    The format is read from the directory, whatever ``--ckpt-format`` says (as megatron does):
    ``metadata.json`` means torch_dist, ``mp_rank_*`` directories mean legacy. ``--finetune`` loads the
    model only and restarts at iteration 0."""
    iteration = latest_iteration(settings.load)
    if iteration is None:
        return None
    path = iter_dir(settings.load, iteration)
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return _load_torch_dist(path, settings, chunks, optimizer, scheduler)
    from mindspeed_train import ckpt_legacy

    if ckpt_legacy.is_legacy(path):
        it, consumed = ckpt_legacy.load(path, settings, _single(chunks), optimizer, scheduler)
        return Loaded(iteration=it, consumed_samples=consumed)
    raise ValueError(f"--load {settings.load}: {path} is neither a torch_dist checkpoint (metadata.json) nor a legacy "
                     "one (mp_rank_* directories); point --load at a checkpoint directory")  # fmt: skip


def _load_torch_dist(path: str, settings: CheckpointSettings, chunks, optimizer, scheduler) -> Loaded:
    from megatron.core import dist_checkpointing

    with_optim = settings.load_optim and not settings.finetune
    with_rng = settings.load_rng and not settings.finetune
    state = _sharded_state(chunks, optimizer, with_optim=with_optim, with_rng=with_rng, is_loading=True)
    loaded = dist_checkpointing.load(state, path)
    for key, chunk in zip(_model_keys(chunks), chunks, strict=True):
        chunk.module.load_state_dict(loaded[key])
    if not with_optim:
        with torch.no_grad():  # main (fp32) parameters of a bf16 model follow the loaded weights, as in megatron
            optimizer.reload_model_params()
    if settings.finetune:
        return Loaded(iteration=0, consumed_samples=0)
    if with_optim:
        # no_grad: with fp32 parameters the distributed optimizer's main shards are views of the
        # model's (autograd leaf) parameters, and megatron copies the loaded values into them in place.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        if loaded.get("adam_step") is not None:
            _set_adam_step(optimizer, loaded["adam_step"])
    if with_rng:
        _restore_rng(loaded["rng_state"])
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    return Loaded(iteration=int(loaded["iteration"]), consumed_samples=int(loaded["consumed_samples"]))
