"""Loop features against runs without them, through the real `mindspeed train` path (4 steps,
fp32, no dropout, tiny qwen2):

- recomputation (full uniform, full block, selective core attention, norms, MLP activations), the fused linear
  cross-entropy and turning gradient-accumulation fusion off change memory or speed, not numbers: losses (1e-5)
  and grad norms (1e-4) of the plain run;
- sequence parallelism at TP=2 equals TP=1;
- virtual pipeline stages (PP=2 x 2 chunks of a 4-layer model, megatron's interleaved 1F1B) equal
  PP=1 from the same start; its torch_dist checkpoint (``model0``/``model1``) resumes exactly;
- ``--reset-attention-mask`` (documents split at EOD, fed as THD with cu_seqlens) at PP=2 equals
  the same at PP=1 (the schedule ships ``[micro x S, 1, H]`` between stages);
- fp16 with a constant loss scale follows the fp32 run within fp16's resolution (relative 1e-3:
  its 11-bit significand gives ~4.9e-4 per rounding); megatron's dynamic scaler skips overflowing
  steps, leaving the LR schedule where it was, and halves the scale after ``hysteresis`` of them.
"""

from __future__ import annotations

import os

import pytest
import train_helpers as th

from mindspeed_kernels.testing import run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]
LOSS_TOL, NORM_TOL = 1e-5, 1e-4
RECOMPUTE = {
    "full_uniform": ("--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"),
    "full_block": ("--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1"),
    "selective": ("--recompute-granularity", "selective", "--profile", "--profile-step-start", "1",
                  "--profile-step-end", "3"),
    "norm": ("--recompute-norm", "--use-mcore-models"),
    "activation": ("--recompute-activation-function",),
    # not recomputes, but the same promise: the fused linear cross-entropy changes memory, not numbers,
    # and so does adding weight gradients into the DDP buffer after the GEMM (fusion is the default)
    "fused_ce": ("--cross-entropy-loss-fusion",),
    "no_grad_accum_fusion": ("--no-gradient-accumulation-fusion",),
}
PACKED = ("--reset-attention-mask",)


def _single_world(rank: int, root: str) -> None:
    from mindspeed_train.launch import train

    train(th.flags(root, os.path.join(root, "plain")))
    for name, extra in RECOMPUTE.items():
        profile = ("--profile-save-path", os.path.join(root, f"{name}_profile"))
        train(th.flags(root, os.path.join(root, name), extra=(*extra, *profile)))
    init = os.path.join(root, "init")
    train(th.flags(root, init, iters=1, extra=("--save", init)))
    train(th.flags(root, os.path.join(root, "packed_pp1"), extra=(*PACKED, "--load", init, "--finetune")))
    train(th.flags(root, os.path.join(root, "fp16"), extra=("--fp16", "--loss-scale", "128")))
    overflow = ("--fp16", "--initial-loss-scale", str(2.0**40), "--hysteresis", "2")
    train(th.flags(root, os.path.join(root, "overflow"), extra=overflow))
    deep = os.path.join(root, "init_deep")
    train(th.flags(root, deep, iters=1, model="deep", extra=("--save", deep)))
    train(th.flags(root, os.path.join(root, "deep_pp1"), model="deep", extra=("--load", deep, "--finetune")))


def _pair_world(rank: int, root: str) -> None:
    import torch

    from mindspeed_train.launch import train

    train(th.flags(root, os.path.join(root, "sp"), extra=("--tensor-model-parallel-size", "2", "--sequence-parallel")))
    init = ("--load", os.path.join(root, "init"), "--finetune")
    train(th.flags(root, os.path.join(root, "packed_pp2"), extra=(*PACKED, "--pipeline-model-parallel-size", "2", *init)))
    vpp, ck = ("--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"), os.path.join(root, "vck")
    deep = ("--load", os.path.join(root, "init_deep"), "--finetune")
    train(th.flags(root, os.path.join(root, "vpp"), model="deep", extra=(*vpp, *deep, "--save", ck, "--save-interval", "2")))
    if rank == 0:  # resume from the step-2 checkpoint (the tracker names the newest, 4)
        with open(os.path.join(ck, "latest_checkpointed_iteration.txt"), "w") as handle:
            handle.write("2")
    torch.distributed.barrier()
    train(th.flags(root, os.path.join(root, "vpp_resumed"), model="deep", extra=(*vpp, "--load", ck)))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("features"))
    th.prepare(path)
    th.write_model(path, name="deep", layers=4)
    run_world(_single_world, 1, path, timeout_s=240)
    run_world(_pair_world, 2, path, timeout_s=150)
    return path


def _same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) == 4
    for mine, ref in zip(got, want, strict=True):
        assert abs(mine["loss"] - ref["loss"]) <= LOSS_TOL, (mine, ref)
        assert abs(mine["grad_norm"] - ref["grad_norm"]) <= NORM_TOL, (mine, ref)
        assert mine["lr"] == pytest.approx(ref["lr"], rel=1e-12)


@pytest.mark.parametrize("name", sorted(RECOMPUTE))
def test_recompute_keeps_the_numbers(root, name):
    _same(th.read(os.path.join(root, name)), th.read(os.path.join(root, "plain")))


def test_profile_through_the_cli(root):
    """The selective run profiled 0-based iterations [1, 3): the logged iterations 2-3."""
    assert os.listdir(os.path.join(root, "selective_profile")) == ["rank0.iter2-3.pt.trace.json"]


def test_sequence_parallel_equals_tp1(root):
    _same(th.read(os.path.join(root, "sp")), th.read(os.path.join(root, "plain")))


def test_virtual_pipeline_equals_pp1_and_resumes(root):
    vpp = th.read(os.path.join(root, "vpp"))
    _same(vpp, th.read(os.path.join(root, "deep_pp1")))
    resumed = th.read(os.path.join(root, "vpp_resumed"))
    assert [r["iteration"] for r in resumed] == [3, 4]
    for got, want in zip(resumed, vpp[2:], strict=True):
        assert (got["loss"], got["grad_norm"], got["lr"]) == pytest.approx((want["loss"], want["grad_norm"], want["lr"]),
                                                                           rel=0, abs=1e-7)


def test_packed_documents_pp2_equals_pp1(root):
    packed = th.read(os.path.join(root, "packed_pp1"))
    _same(th.read(os.path.join(root, "packed_pp2")), packed)
    # attention stops at EOD: the losses are not those of whole-row attention from the same start
    assert abs(packed[0]["loss"] - th.read(os.path.join(root, "plain"))[0]["loss"]) > LOSS_TOL


def test_fp16_follows_fp32(root):
    fp16, plain = th.read(os.path.join(root, "fp16")), th.read(os.path.join(root, "plain"))
    for half, full in zip(fp16, plain, strict=True):
        assert half["loss"] == pytest.approx(full["loss"], rel=1e-3)
        assert half["loss_scale"] == 128.0 and not half["skipped"]


def test_fp16_overflow_skips_and_backs_off(root):
    """megatron's DynamicGradScaler: each overflow spends one unit of hysteresis (2); once spent,
    every further overflow halves the scale. Skipped steps do not move the LR schedule."""
    rows = th.read(os.path.join(root, "overflow"))
    assert [r["skipped"] for r in rows] == [True] * 4
    assert [r["loss_scale"] for r in rows] == [2.0**40, 2.0**39, 2.0**38, 2.0**37]
    assert {r["lr"] for r in rows} == {0.0}  # warmup starts at lr_warmup_init (0) and never advanced
    assert rows[0]["loss"] == pytest.approx(th.read(os.path.join(root, "plain"))[0]["loss"], rel=1e-3)
