"""Context parallelism through `mindspeed train` (``launch.train``): every algorithm trains the
tiny qwen2 (GQA) with the losses (1e-5) and gradient norms (1e-4) of the one-process run over 4
steps: ulysses and ring at CP=2 (ring also with a general mask kept on the CPU, the send/recv
overlap, and per-token loss), ulysses (kv heads repeated), hybrid (2 x 2) and the double ring
(window 2), hybrid adaptive at CP=4, adaptive (and its options) at CP=2; and a DeepSeek-V3-style
model (MLA, MoE with a shared expert, MTP) — the demo's architecture — with every algorithm: ring,
ulysses (with the fused linear cross-entropy) and adaptive at CP=2, hybrid and hybrid adaptive at
CP=4."""

from __future__ import annotations

import os

import pytest
import train_helpers as th

from mindspeed_kernels.testing import run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(600), pytest.mark.slow]
CP = ("--use-mcore-models", "--context-parallel-size")
CP2_RUNS = {
    "ring": (*CP, "2", "--context-parallel-algo", "megatron_cp_algo"),
    "ulysses": (*CP, "2", "--context-parallel-algo", "ulysses_cp_algo"),
    "ring_general": (*CP, "2", "--context-parallel-algo", "megatron_cp_algo", "--cp-attention-mask-type", "general",
                     "--attention-mask-on-cpu", "--use-cp-send-recv-overlap"),
    "ring_per_token": (*CP, "2", "--context-parallel-algo", "megatron_cp_algo", "--calculate-per-token-loss"),
    "adaptive": (*CP, "2", "--context-parallel-algo", "adaptive_cp_algo"),
    "adaptive_options": (*CP, "2", "--context-parallel-algo", "adaptive_cp_algo", "--cp-attention-mask-type", "general",
                         "--adaptive-cp-only-reschedule", "--adaptive-cp-without-coarse",
                         "--adaptive-cp-dynamic-attn-mask"),
    "adaptive_mask_list": (*CP, "2", "--context-parallel-algo", "adaptive_cp_algo",
                           "--adaptive-cp-manually-set-mask-list"),
}  # fmt: skip
CP4_RUNS = {
    "ulysses4": (*CP, "4", "--context-parallel-algo", "ulysses_cp_algo"),
    "hybrid": (*CP, "4", "--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "2"),
    "double_ring": (*CP, "4", "--context-parallel-algo", "megatron_cp_algo", "--cp-window-size", "2"),
    "hybrid_adaptive": (*CP, "4", "--context-parallel-algo", "hybrid_adaptive_cp_algo", "--ulysses-degree-in-cp", "2"),
}  # fmt: skip


def _train(root: str, name: str, extra: tuple[str, ...] = (), model: str = "model") -> None:
    import torch

    from mindspeed_train.launch import train

    torch.set_num_threads(1)  # 2-4 ranks share 2 cores
    train(th.flags(root, os.path.join(root, name), model=model, extra=extra))


def _reference_world(rank: int, root: str) -> None:
    _train(root, "ref")
    _train(root, "ref_per_token", ("--calculate-per-token-loss",))
    _train(root, "ref_deepseek", model="deepseek")


def _cp2_world(rank: int, root: str) -> None:
    for name, extra in CP2_RUNS.items():
        _train(root, name, extra)
    _train(root, "deepseek_ring", CP2_RUNS["ring"], model="deepseek")
    # MTP's label roll on the contiguous layout, through the fused linear cross-entropy's MTP path
    _train(root, "deepseek_ulysses_fused", (*CP2_RUNS["ulysses"], "--cross-entropy-loss-fusion"), model="deepseek")
    _train(root, "deepseek_adaptive", CP2_RUNS["adaptive"], model="deepseek")


def _cp4_world(rank: int, root: str) -> None:
    for name, extra in CP4_RUNS.items():
        _train(root, name, extra)
    _train(root, "deepseek_hybrid_adaptive", CP4_RUNS["hybrid_adaptive"], model="deepseek")
    _train(root, "deepseek_hybrid", CP4_RUNS["hybrid"], model="deepseek")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("cp"))
    th.prepare(path)
    th.write_deepseek(path)
    run_world(_reference_world, 1, path, timeout_s=200)
    return path


def test_cp2_algorithms_match_one_process(root):
    run_world(_cp2_world, 2, root, timeout_s=300)
    ref = th.read(os.path.join(root, "ref"))
    for name in ("ring", "ulysses", "ring_general", "adaptive", "adaptive_options", "adaptive_mask_list"):
        th.assert_same_run(th.read(os.path.join(root, name)), ref)
    th.assert_same_run(th.read(os.path.join(root, "ring_per_token")), th.read(os.path.join(root, "ref_per_token")))
    deepseek = th.read(os.path.join(root, "ref_deepseek"))
    assert {"mtp_1 loss"} <= set(deepseek[0]["aux"]), deepseek[0]["aux"]
    th.assert_same_run(th.read(os.path.join(root, "deepseek_ring")), deepseek)
    th.assert_same_run(th.read(os.path.join(root, "deepseek_ulysses_fused")), deepseek)
    th.assert_same_run(th.read(os.path.join(root, "deepseek_adaptive")), deepseek)


def test_cp4_algorithms_match_one_process(root):
    run_world(_cp4_world, 4, root, timeout_s=300)
    ref = th.read(os.path.join(root, "ref"))
    for name in CP4_RUNS:
        th.assert_same_run(th.read(os.path.join(root, name)), ref)
    for name in ("deepseek_hybrid_adaptive", "deepseek_hybrid"):
        th.assert_same_run(th.read(os.path.join(root, name)), th.read(os.path.join(root, "ref_deepseek")))
