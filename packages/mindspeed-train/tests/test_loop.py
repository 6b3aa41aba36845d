"""The training loop's invariances on CPU/gloo through the real `mindspeed train` code path
(``launch.train``): 4 steps, fp32, no dropout, a tiny qwen2 (and qwen3_moe). TP=2, DP=2 (with the
distributed optimizer, half the microbatches per rank), PP=2 (1F1B) and, for the MoE model, EP=2 x DP=2
must give the losses (1e-5) and gradient norms (1e-4) of TP=1 x DP=1 accumulating all 4 microbatches
in one process. Host-side initialisation makes TP shards independent of the layout; PP stages and EP
ranks draw only their own layers' / experts' weights, so those runs start from one checkpoint
(``--load INIT --finetune``, resharded by megatron's dist_checkpointing). The loss falls on a
learnable corpus."""

from __future__ import annotations

import math
import os

import pytest
import train_helpers as th

from mindspeed_kernels.testing import run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]


def _reference_world(rank: int, root: str) -> None:
    from mindspeed_train import loop
    from mindspeed_train.launch import build_config, train

    argv = th.flags(root, os.path.join(root, "tp1"))
    train(argv)
    for model in ("model", "moe"):  # the common starting points of the PP / EP comparisons
        init = os.path.join(root, f"init_{model}")
        train(th.flags(root, init, iters=1, model=model, extra=("--save", init)))
        train(th.flags(root, os.path.join(root, f"ref_{model}"), model=model, extra=("--load", init, "--finetune")))
    # megatron's weight-decay grouping: matrices decay, biases and 1-D parameters (norms) do not.
    job = loop.build_job(build_config(argv))
    names = {id(p): n for n, p in job.model.module.named_parameters()}
    groups = [g for part in job.optimizer.chained_optimizers for g in part.optimizer.param_groups]
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    exempt = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    shapes = dict((n, p.dim()) for n, p in job.model.module.named_parameters())
    assert all(shapes[n] >= 2 for n in decayed) and all(shapes[n] == 1 for n in exempt)
    assert any(n.endswith("linear_qkv.bias") for n in exempt) and any("layernorm" in n for n in exempt)


def _parallel_world(rank: int, root: str) -> None:
    from megatron.core import parallel_state as ps

    from mindspeed_train.launch import train

    train(th.flags(root, os.path.join(root, "tp2"), extra=("--tensor-model-parallel-size", "2")))
    assert (ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size()) == (2, 1)
    train(th.flags(root, os.path.join(root, "dp2"), extra=("--use-distributed-optimizer",)))
    assert (ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size()) == (1, 2)
    init = ("--load", os.path.join(root, "init_model"), "--finetune")
    train(th.flags(root, os.path.join(root, "pp2"), extra=("--pipeline-model-parallel-size", "2", *init)))
    assert (ps.get_pipeline_model_parallel_world_size(), ps.get_data_parallel_world_size()) == (2, 1)
    init = ("--load", os.path.join(root, "init_moe"), "--finetune")
    train(th.flags(root, os.path.join(root, "ep2"), model="moe", extra=("--expert-model-parallel-size", "2", *init)))
    assert (ps.get_expert_model_parallel_world_size(), ps.get_data_parallel_world_size()) == (2, 2)


def _learn_world(rank: int, root: str) -> None:
    from mindspeed_train.launch import train

    train(th.flags(root, os.path.join(root, "learn"), iters=20, global_batch=8, micro=4, lr=1e-2))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("loop"))
    th.prepare(path)
    return path


def _cosine_lr(samples: int, lr=1e-2, min_lr=1e-4, warmup=4, decay=16) -> float:
    """th.flags' schedule by its definition: linear warmup over 1 iteration (4 samples), then
    cosine from lr to min_lr at 4 iterations (16 samples)."""
    if samples <= warmup:
        return lr * samples / warmup
    ratio = (samples - warmup) / (decay - warmup)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1) * (lr - min_lr)


def test_tp2_dp2_pp2_ep2_match_one_process(root):
    run_world(_reference_world, 1, root, timeout_s=150)
    run_world(_parallel_world, 2, root, timeout_s=150)
    ref = th.read(os.path.join(root, "tp1"))
    assert ref[0]["loss"] != ref[-1]["loss"], "the parameters must change between steps"
    assert [r["lr"] for r in ref] == pytest.approx([_cosine_lr(4 * i) for i in range(1, 5)], rel=1e-12)
    th.assert_same_run(th.read(os.path.join(root, "tp2")), ref)
    th.assert_same_run(th.read(os.path.join(root, "dp2")), ref)
    th.assert_same_run(th.read(os.path.join(root, "pp2")), th.read(os.path.join(root, "ref_model")))
    th.assert_same_run(th.read(os.path.join(root, "ep2")), th.read(os.path.join(root, "ref_moe")))
    # the MoE runs log megatron's balancing loss (compared across layouts above); dense runs log none
    assert all(r["aux"]["load_balancing_loss"] > 0 for r in th.read(os.path.join(root, "ref_moe")))
    assert all(r["aux"] is None for r in ref)


def test_loss_falls_on_a_learnable_corpus(root):
    run_world(_learn_world, 1, root, timeout_s=120)
    losses = [r["loss"] for r in th.read(os.path.join(root, "learn"))]
    assert len(losses) == 20
    first, last = losses[0], sum(losses[-3:]) / 3
    assert last < first - 1.0, f"loss {first:.3f} -> {last:.3f} did not fall clearly"
