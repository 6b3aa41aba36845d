"""Checkpoints through the real `mindspeed train` path on 2 gloo ranks: DP=2 with and without the
distributed optimizer (whose state is sharded over DP; that variant in bf16, so its fp32 main
parameters go through the checkpoint), PP=2, and MoE with EP=2 plus the distributed optimizer. A
4-step run saves at step 2 and is killed inside the save of step 4, after every shard is written but
before the rename: that checkpoint must never load. Resuming then starts from step 2 and
must reproduce the killed run's steps 3-4 (losses, grad norms, lr) exactly: model, Adam state, LR
schedule, RNG and data position all restored."""

from __future__ import annotations

import os

import pytest
import train_helpers as th

from mindspeed_kernels.testing import run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]
VARIANTS = {  # name -> (model, flags)
    "distopt": ("model", ("--use-distributed-optimizer", "--bf16")),
    "plain": ("model", ()),
    "pp2": ("model", ("--pipeline-model-parallel-size", "2")),
    "ep2": ("moe", ("--expert-model-parallel-size", "2", "--use-distributed-optimizer")),
}
def _ckpt_world(rank: int, root: str) -> None:
    from megatron.core import dist_checkpointing

    from mindspeed_train.launch import train

    for name, (model, extra) in VARIANTS.items():
        # megatron's dist_checkpointing.save(state, path): dies after writing the step-4 shards
        th.kill_in_save_then_resume(root, name, model, extra, dist_checkpointing, "save", path_arg=1)
    # --finetune: the trained weights only; iteration, data position and schedule start over.
    train(th.flags(root, os.path.join(root, "finetune"), iters=1, extra=("--load", os.path.join(root, "plain_ck"), "--finetune")))


def test_killed_save_is_never_loaded_and_resume_continues_the_curve(tmp_path):
    root = str(tmp_path)
    th.prepare(root)
    run_world(_ckpt_world, 2, root, timeout_s=120)
    for name in VARIANTS:
        th.check_killed_then_resumed(root, name)
    (finetune,) = th.read(os.path.join(root, "finetune"))
    fresh = th.read(os.path.join(root, "plain_killed"))[0]
    assert finetune["iteration"] == 1 and finetune["consumed_samples"] == 4 and finetune["lr"] == fresh["lr"]
    assert finetune["loss"] < fresh["loss"] - 0.05, "the finetune run must start from the trained weights"


def test_killed_save_leaves_nothing_that_loads(tmp_path):
    """Without a committed checkpoint, --load starts from scratch: the killed .tmp is ignored."""
    from mindspeed_train import ckpt

    root = str(tmp_path)
    os.makedirs(os.path.join(root, th.KILLED))
    open(os.path.join(root, th.KILLED, "metadata.json"), "w").write("{}")
    assert ckpt.latest_iteration(root) is None


def test_prune_keeps_the_newest_committed_checkpoints(tmp_path):
    from mindspeed_train import ckpt

    root = str(tmp_path)
    for name in ("iter_0000002", "iter_0000010", "iter_0000004", "iter_0000012.tmp", "hf_config"):
        os.makedirs(os.path.join(root, name))
    deleted = ckpt.prune_checkpoints(root, keep=2, current=10)
    assert sorted(os.path.basename(p) for p in deleted) == ["iter_0000002"]
    assert sorted(os.listdir(root)) == ["hf_config", "iter_0000004", "iter_0000010", "iter_0000012.tmp"]
    # the checkpoint the tracker names survives even when newer directories exist (a resumed run)
    ckpt.prune_checkpoints(root, keep=1, current=4)
    assert sorted(os.listdir(root)) == ["hf_config", "iter_0000004", "iter_0000012.tmp"]
    with pytest.raises(ValueError, match="--save-total-limit"):
        ckpt.prune_checkpoints(root, keep=0, current=4)
