"""Evaluation, TensorBoard, the loss curve, checkpoint rotation and bf16 through the real
`mindspeed train` path (``launch.train``) on 2 gloo ranks: 4 steps of the tiny qwen2 with an 80/20
split, evaluating 2 global batches every 2 steps, DP=2 unless TP=2.

- eval loss == a hand-run forward (logits + torch's cross-entropy) of all 8 validation samples of the
  step-4 evaluation by the step-4 weights loaded from the run's checkpoint (each DP rank evaluates
  half of them: the match shows the loss is averaged over DP);
- TensorBoard's own EventAccumulator reads back the scalars of metrics.jsonl;
- ``loss_curve.png`` is a PNG of the documented size; ``--save-total-limit 1`` leaves the newest only;
- ``--bf16`` (Float16Module, fp32 main params): losses within the bf16 tolerance of fp32, and
  TP=2 bf16 == TP=1 (DP=2) bf16 within the bf16 tolerance;
- ``--manual-gc --manual-gc-interval 2``: megatron's schedule of collections (all generations at the start,
  before each evaluation and every 2nd iteration; generation 0 after each evaluation), none automatic in
  the run, the collector enabled again afterwards, and the same losses as the run without it."""

from __future__ import annotations

import gc
import json
import os
import struct

import numpy as np
import pytest
import torch
import train_helpers as th

from mindspeed_kernels.testing import TOLERANCES, run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]
EVAL = ("--split", "80,20,0", "--eval-interval", "2", "--eval-iters", "2")
FP32_TOL = TOLERANCES[torch.float32]
BF16_TOL = TOLERANCES[torch.bfloat16]


def _fp32_flags(root: str) -> list[str]:
    ck = os.path.join(root, "ck")
    extra = (*EVAL, "--tensorboard-dir", os.path.join(root, "tb"), "--save", ck, "--save-interval", "2",
             "--save-total-limit", "1")  # fmt: skip
    return th.flags(root, os.path.join(root, "fp32"), extra=extra)


def _hand_eval_loss(root: str) -> float:
    """The step-4 evaluation by hand: load iter 4, then torch cross-entropy over the logits of the
    second evaluation's validation samples (8..15: the first evaluation took 0..7)."""
    from mindspeed_train import loop
    from mindspeed_train.data.gpt import build_datasets
    from mindspeed_train.launch import build_config

    config = build_config(th.flags(root, os.path.join(root, "hand"), extra=(*EVAL, "--load", os.path.join(root, "ck"),
                                                                            "--finetune")))  # fmt: skip
    loop.init_parallel(config)
    job = loop.build_job(config)
    loop.resume(job)
    _, valid = build_datasets(config.data_path, split="80,20,0", seq_length=16, seed=1234, num_samples=16,
                              valid_samples=3 * 2 * 4, eod=th.EOS, vocab_size=job.spec.vocab_size)  # fmt: skip
    model, losses = job.model.module, []
    model.eval()
    with torch.no_grad():
        for index in range(8, 16):
            sample = valid[index]
            tokens = torch.as_tensor(sample["tokens"])[None]
            logits = model(tokens, torch.as_tensor(sample["position_ids"])[None], None)[0, :, : th.VOCAB]
            per_token = torch.nn.functional.cross_entropy(logits.double(), torch.as_tensor(sample["labels"]), reduction="none")
            mask = torch.as_tensor(sample["loss_mask"]).double()
            losses.append(float((per_token * mask).sum() / mask.sum()))
    return sum(losses) / len(losses)


def _manual_gc_run(root: str, rank: int) -> None:
    """The fp32 run with manual collection; writes the generations collected while the automatic collector
    was off (ours: automatic ones cannot run then) and whether it is on again afterwards."""
    from mindspeed_train.launch import train

    with th.manual_collections() as manual:
        train(th.flags(root, os.path.join(root, "manual_gc"), extra=(*EVAL, "--manual-gc", "--manual-gc-interval", "2")))
    if rank == 0:
        with open(os.path.join(root, "gc.json"), "w") as handle:
            json.dump({"generations": manual, "enabled_after": gc.isenabled()}, handle)


def _world(rank: int, root: str) -> None:
    from mindspeed_train import loop
    from mindspeed_train.launch import build_config, train

    train(_fp32_flags(root))
    _manual_gc_run(root, rank)
    train(th.flags(root, os.path.join(root, "bf16"), extra=(*EVAL, "--bf16")))
    train(th.flags(root, os.path.join(root, "tp2_bf16"), extra=(*EVAL, "--bf16", "--tensor-model-parallel-size", "2")))
    hand = _hand_eval_loss(root)
    if rank == 0:
        with open(os.path.join(root, "hand.json"), "w") as handle:
            json.dump({"eval_loss": hand}, handle)
    # --bf16 builds bf16 weights inside megatron's Float16Module and fp32 main params in the optimizer.
    job = loop.build_job(build_config(th.flags(root, os.path.join(root, "probe"), extra=("--bf16",))))
    assert type(job.model.module).__name__ == "Float16Module"
    assert {p.dtype for p in job.model.module.parameters()} == {torch.bfloat16}
    mains = [p for part in job.optimizer.chained_optimizers for g in part.optimizer.param_groups for p in g["params"]]
    assert mains and {p.dtype for p in mains} == {torch.float32}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("eval"))
    th.prepare(path)
    run_world(_world, 2, path, timeout_s=200)
    return path


def _close(got: float, want: float, tol: tuple[float, float]) -> bool:
    rtol, atol = tol
    return abs(got - want) <= atol + rtol * abs(want)


def test_eval_loss_is_a_hand_forward_of_the_validation_samples(root):
    rows = th.read(os.path.join(root, "fp32"))
    assert [r["eval_loss"] is not None for r in rows] == [False, True, False, True]
    with open(os.path.join(root, "hand.json")) as handle:
        hand = json.load(handle)["eval_loss"]
    assert _close(rows[-1]["eval_loss"], hand, FP32_TOL), (rows[-1]["eval_loss"], hand)
    assert rows[1]["eval_loss"] != rows[3]["eval_loss"]  # other weights, other samples


def test_tensorboard_events_hold_the_metrics(root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mindspeed_train.metrics import TENSORBOARD_TAGS

    events = EventAccumulator(os.path.join(root, "tb"))
    events.Reload()
    rows = th.read(os.path.join(root, "fp32"))
    for field, tag in TENSORBOARD_TAGS.items():
        want = [(r["iteration"], r[field]) for r in rows if r[field] is not None]
        # TensorBoard stores scalars as float32: compare with the JSON values rounded the same way.
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(step, float(np.float32(value))) for step, value in want], tag


def test_loss_curve_png_and_save_total_limit(root):
    from mindspeed_train.metrics import LOSS_CURVE_SIZE

    with open(os.path.join(root, "fp32", "loss_curve.png"), "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    assert struct.unpack(">II", head[16:24]) == LOSS_CURVE_SIZE
    ck = os.path.join(root, "ck")
    assert sorted(os.listdir(ck)) == ["hf_config", "iter_0000004", "latest_checkpointed_iteration.txt"]


def test_bf16_tracks_fp32_and_tp2_matches_tp1(root):
    fp32, bf16 = th.read(os.path.join(root, "fp32")), th.read(os.path.join(root, "bf16"))
    tp2 = th.read(os.path.join(root, "tp2_bf16"))
    assert [r["iteration"] for r in bf16] == [1, 2, 3, 4] == [r["iteration"] for r in tp2]
    assert any(a["loss"] != b["loss"] for a, b in zip(bf16, fp32, strict=True)), "bf16 must actually run in bf16"
    for key in ("loss", "eval_loss", "grad_norm"):
        for low, ref, other in zip(bf16, fp32, tp2, strict=True):
            if ref[key] is None:
                continue
            assert _close(low[key], ref[key], BF16_TOL), (key, low, ref)
            assert _close(other[key], low[key], BF16_TOL), (key, other, low)


def test_manual_gc_schedule_and_same_losses(root):
    with open(os.path.join(root, "gc.json")) as handle:
        record = json.load(handle)
    # start; iteration 2: evaluation (2 before, 0 after), then the interval's; iteration 4 the same
    assert record == {"generations": [2, 2, 0, 2, 2, 0, 2], "enabled_after": True}
    fp32, manual = th.read(os.path.join(root, "fp32")), th.read(os.path.join(root, "manual_gc"))
    for key in ("loss", "eval_loss", "grad_norm"):
        assert [r[key] for r in manual] == [r[key] for r in fp32], key
