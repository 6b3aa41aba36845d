"""Tiny model configs, a learnable toy corpus written as a Megatron indexed dataset, and the flags
of a short `mindspeed train` run, shared by the loop tests."""

from __future__ import annotations

import contextlib
import gc
import json
import os

import numpy as np

VOCAB, EOS = 256, 0


@contextlib.contextmanager
def manual_collections():
    """Yields the list of generations collected while Python's automatic collector is off (so only
    explicit ``gc.collect`` calls: automatic ones cannot run then)."""
    seen: list[int] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start" and not gc.isenabled():
            seen.append(info["generation"])

    gc.callbacks.append(record)
    try:
        yield seen
    finally:
        gc.callbacks.remove(record)


def write_model(root: str, name: str = "model", layers: int = 2) -> str:
    """A ``layers``-layer qwen2 config (GQA, q/k/v bias, fp32, no dropout) in ``root/name``; returns its directory."""
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    config = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                  eos_token_id=EOS, tie_word_embeddings=False, attention_dropout=0.0)  # fmt: skip
    with open(os.path.join(path, "config.json"), "w") as handle:
        json.dump(config, handle)
    return path


def write_moe_model(root: str) -> str:
    """A 2-layer qwen3_moe config (4 experts, top-2, aux loss on); returns its directory."""
    path = os.path.join(root, "moe")
    os.makedirs(path, exist_ok=True)
    config = dict(model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                  rms_norm_eps=1e-6, eos_token_id=EOS, tie_word_embeddings=False, attention_dropout=0.0, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, router_aux_loss_coef=0.01)  # fmt: skip
    with open(os.path.join(path, "config.json"), "w") as handle:
        json.dump(config, handle)
    return path


def write_deepseek(root: str, layers: int = 2) -> str:
    """A tiny DeepSeek-V3-style config in ``root/deepseek`` (the demo's architecture): MLA, a dense
    first layer then MoE (4 experts top-2, sigmoid router with expert bias, 1 shared expert), one
    MTP layer; returns its directory."""
    path = os.path.join(root, "deepseek")
    os.makedirs(path, exist_ok=True)
    config = dict(model_type="deepseek_v3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                  moe_intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                  q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                  first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
                  scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=1,
                  max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6, attention_dropout=0.0,
                  attention_bias=False, tie_word_embeddings=False, eos_token_id=EOS)  # fmt: skip
    with open(os.path.join(path, "config.json"), "w") as handle:
        json.dump(config, handle)
    return path


def write_corpus(root: str, documents: int = 64, seed: int = 0) -> str:
    """Documents that count upwards (each next token = previous + 1, wrapping in 1..255) from a
    random start, each ended by EOS: a corpus a tiny model learns in a few steps. Returns the
    ``--data-path`` prefix."""
    from mindspeed_train.data.writer import IndexedWriter

    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    prefix = os.path.join(root, "data", "toy_text_document")
    rng = np.random.default_rng(seed)
    with IndexedWriter({"text": prefix}) as writer:
        for _ in range(documents):
            start, length = int(rng.integers(1, VOCAB)), int(rng.integers(8, 40))
            writer.add("text", [(start + i - 1) % (VOCAB - 1) + 1 for i in range(length)] + [EOS])
    return prefix


def prepare(root: str) -> tuple[str, str]:
    """Model configs and corpus under ``root``; returns (dense model dir, data prefix)."""
    write_moe_model(root)
    return write_model(root), write_corpus(root)


def flags(root: str, out: str, *, iters: int = 4, micro: int = 1, global_batch: int = 4, lr: float = 1e-2,
          model: str = "model", extra: tuple[str, ...] = ()) -> list[str]:
    """A short run: seq 16, warmup 1 iteration then cosine decay over 4 (fixed, so a shorter first
    half of a resumed run has the same schedule), clipping at 1.0, weight decay 0.1."""
    model, data = os.path.join(root, model), os.path.join(root, "data", "toy_text_document")
    return ["--model", model, "--data-path", data, "--micro-batch-size", str(micro),
            "--global-batch-size", str(global_batch), "--seq-length", "16", "--train-iters", str(iters),
            "--lr", str(lr), "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
            "--lr-decay-iters", "4" if iters <= 4 else str(iters), "--weight-decay", "0.1", "--clip-grad", "1.0",
            "--seed", "1234", "--log-interval", "1", "--output-dir", out, *extra]  # fmt: skip


def read(out: str) -> list[dict]:
    from mindspeed_train.metrics import read_metrics

    return read_metrics(out)


KILLED = "iter_0000004.tmp"  # the checkpoint the kill-in-save pattern interrupts


class Killed(RuntimeError):
    """Raised in place of the process dying inside a save."""


def kill_in_save_then_resume(root: str, name: str, model: str, extra: tuple[str, ...], owner, attr: str,
                             path_arg: int) -> None:
    """Run ``{name}_killed`` (4 steps, saving every 2 into ``{name}_ck``) with ``owner.attr`` (a
    checkpoint writer whose positional argument ``path_arg`` is the directory it writes) replaced by
    one that raises :class:`Killed` right after writing the step-4 checkpoint, before its rename;
    then ``{name}_resumed`` from that directory. ``extra``: flags of both runs."""
    from mindspeed_train.launch import train

    original = getattr(owner, attr)

    def killing(*args, **kwargs):
        result = original(*args, **kwargs)
        if os.path.basename(os.path.normpath(args[path_arg])) == KILLED:
            raise Killed(args[path_arg])
        return result

    ck = os.path.join(root, f"{name}_ck")
    setattr(owner, attr, killing)
    try:
        train(flags(root, os.path.join(root, f"{name}_killed"), model=model, extra=("--save", ck, "--save-interval", "2",
                                                                                   *extra)))  # fmt: skip
        raise AssertionError("the step-4 save should have been killed")
    except Killed:
        pass
    finally:
        setattr(owner, attr, original)
    train(flags(root, os.path.join(root, f"{name}_resumed"), model=model, extra=("--load", ck, "--save", ck, *extra)))


def check_killed_then_resumed(root: str, name: str) -> str:
    """The kill-in-save-4 / resume-from-2 pattern of the checkpoint tests: run ``{name}_killed``
    logged steps 1-4, ``{name}_resumed`` steps 3-4 equal to them (1e-7), and the resumed run's own
    step-4 save replaced the killed one and moved the tracker. Returns the checkpoint directory."""
    import pytest

    killed, resumed = read(os.path.join(root, f"{name}_killed")), read(os.path.join(root, f"{name}_resumed"))
    assert [r["iteration"] for r in killed] == [1, 2, 3, 4]
    assert [r["iteration"] for r in resumed] == [3, 4], "the resume must start after step 2, not the killed step 4"
    assert killed[0]["loss"] != killed[-1]["loss"]
    for got, want in zip(resumed, killed[2:], strict=True):
        for key in ("loss", "grad_norm", "lr", "consumed_samples"):
            assert got[key] == pytest.approx(want[key], rel=0, abs=1e-7), (name, key, got, want)
    ck = os.path.join(root, f"{name}_ck")
    assert sorted(os.listdir(ck)) == ["hf_config", "iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"]
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read() == "4"
    return ck


LOSS_TOL, NORM_TOL = 1e-5, 1e-4  # the invariance tests' limits: per-step loss and grad-norm differences


def assert_same_run(got: list[dict], want: list[dict], loss_tol: float = LOSS_TOL, norm_tol: float = NORM_TOL) -> None:
    """Two 4-step runs' metrics agree: losses, grad norms, auxiliary and eval losses within the
    limits; learning rates and consumed samples equal; and the reference's parameters moved."""
    import pytest

    assert [r["iteration"] for r in got] == [1, 2, 3, 4] == [r["iteration"] for r in want]
    assert want[0]["loss"] != want[-1]["loss"], "the parameters must change between steps"
    for mine, ref in zip(got, want, strict=True):
        assert abs(mine["loss"] - ref["loss"]) <= loss_tol, (mine, ref)
        assert abs(mine["grad_norm"] - ref["grad_norm"]) <= norm_tol, (mine, ref)
        assert mine["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert mine["consumed_samples"] == ref["consumed_samples"]
        assert (mine["aux"] or {}).keys() == (ref["aux"] or {}).keys()
        for name, value in (ref["aux"] or {}).items():
            assert abs(mine["aux"][name] - value) <= loss_tol, (name, mine, ref)
        assert (mine.get("eval_loss") is None) == (ref.get("eval_loss") is None)
        if ref.get("eval_loss") is not None:
            assert abs(mine["eval_loss"] - ref["eval_loss"]) <= loss_tol, (mine, ref)


# Grid-layer runs (TP-2D, NDMM): every run pads the vocabulary to a multiple of 64 x TP (256 for TP
# 1, 2 and 4), so all layouts have the same logits; "_init" runs start from one TP=1 checkpoint.
GRID_VOCAB = ("--make-vocab-size-divisible-by", "64")


def init_flags(root: str) -> tuple[str, ...]:
    """Start from the TP=1 checkpoint ``root/init`` (written by :func:`grid_reference_world`)."""
    return ("--load", os.path.join(root, "init"), "--finetune")


def grid_train(root: str, name: str, extra: tuple[str, ...] = (), iters: int = 4) -> None:
    """One run ``root/name`` of the dense model with ``extra`` flags, one thread per rank."""
    import torch

    from mindspeed_train.launch import train

    torch.set_num_threads(1)  # 2-4 ranks share 2 cores
    train(flags(root, os.path.join(root, name), iters=iters, extra=(*GRID_VOCAB, *extra)))


def grid_reference_world(rank: int, root: str) -> None:
    """The one-process references: ``ref`` (from random init) and ``ref_init`` (from ``init``)."""
    grid_train(root, "ref")
    grid_train(root, "init", ("--save", os.path.join(root, "init")), iters=1)
    grid_train(root, "ref_init", init_flags(root))


def _resume_tp1_world(rank: int, root: str, ck: str) -> None:
    from mindspeed_train.launch import train

    train(flags(root, os.path.join(root, "resumed_tp1"), extra=(*GRID_VOCAB, "--load", ck, "--no-load-rng")))


def assert_resumes_at_tp1(root: str, ck: str, run: list[dict]) -> None:
    """The step-2 checkpoint ``ck`` of ``run`` (a 4-step run saving every 2 steps; model and Adam
    state) continues in one process at TP=1 on the same curve (steps 3 and 4)."""
    from mindspeed_kernels.testing import run_world

    with open(os.path.join(ck, "latest_checkpointed_iteration.txt"), "w") as handle:
        handle.write("2")
    run_world(_resume_tp1_world, 1, root, ck, timeout_s=200)
    resumed = read(os.path.join(root, "resumed_tp1"))
    assert [r["iteration"] for r in resumed] == [3, 4]
    for got, want in zip(resumed, run[2:], strict=True):
        assert abs(got["loss"] - want["loss"]) <= LOSS_TOL, (got, want)
        assert abs(got["grad_norm"] - want["grad_norm"]) <= NORM_TOL, (got, want)


def assert_launch_refused(root: str, monkeypatch, model: str, extra: tuple[str, ...], message: str) -> None:
    """``mindspeed train`` with ``extra`` on a two-rank launch raises ``ValueError(message)`` while the
    launch is validated (before any process group is made)."""
    import pytest

    from mindspeed_train import launch

    prepare(root)
    monkeypatch.setattr(launch, "_world_size", lambda: 2)  # (another test may have left a 1-rank group)
    with pytest.raises(ValueError, match=message):
        launch.build_config(flags(root, os.path.join(root, "x"), model=model, extra=extra))
