"""NDMM through `mindspeed train` (``launch.train``): ``--use-nd-matmul --nd1-dim1-size D1
--nd2-dim1-size D2 --tensor-model-parallel-size 2`` trains the tiny qwen2 (GQA, qkv biases) with the
losses (1e-5) and gradient norms (1e-4) of the one-process TP=1 run over 4 steps, for (D1, D2) =
(1, 2), (2, 1) and (2, 2) (world 2), (1, 2) x DP=2 with the distributed optimizer and (2, 1) x CP=2
(ring attention) (world 4).
Host-side initialisation makes the NDMM shards independent of the layout; runs marked ``_init``
start from one TP=1 checkpoint (``--load INIT --finetune``). An NDMM run's torch_dist checkpoint
resumes at TP=1 (model and optimizer resharded) on the same curve. Every run pads the vocabulary
to a multiple of 64 x TP (256 for TP 1 and 2), so all layouts have the same logits.
"""

from __future__ import annotations

import os

import pytest
import train_helpers as th

from mindspeed_kernels.testing import run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(600), pytest.mark.slow]


def _nd(nd1: int, nd2: int) -> tuple[str, ...]:
    return ("--use-nd-matmul", "--nd1-dim1-size", str(nd1), "--nd2-dim1-size", str(nd2), "--tensor-model-parallel-size", "2")


def _world2(rank: int, root: str) -> None:
    from megatron.core import parallel_state as ps

    th.grid_train(root, "nd12", _nd(1, 2))
    assert ps.get_tensor_model_parallel_world_size() == 2
    th.grid_train(root, "nd21_init", (*_nd(2, 1), *th.init_flags(root)))
    ck = ("--save", os.path.join(root, "ck"), "--save-interval", "2")
    th.grid_train(root, "nd22_init", (*_nd(2, 2), *th.init_flags(root), *ck))


def _world4(rank: int, root: str) -> None:
    from megatron.core import parallel_state as ps

    th.grid_train(root, "nd12_dp2", (*_nd(1, 2), "--use-distributed-optimizer"))
    assert (ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size()) == (2, 2)
    th.grid_train(root, "nd21_cp2_ring", (*_nd(2, 1), "--context-parallel-size", "2", "--use-mcore-models",
                                          "--context-parallel-algo", "megatron_cp_algo"))  # fmt: skip
    assert ps.get_context_parallel_world_size() == 2


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ndmm"))
    th.prepare(path)
    run_world(th.grid_reference_world, 1, path, timeout_s=200)
    return path


def test_ndmm_grids_match_one_process_and_resume_at_tp1(root):
    run_world(_world2, 2, root, timeout_s=400)
    ref, ref_init = th.read(os.path.join(root, "ref")), th.read(os.path.join(root, "ref_init"))
    th.assert_same_run(th.read(os.path.join(root, "nd12")), ref)
    th.assert_same_run(th.read(os.path.join(root, "nd21_init")), ref_init)
    run = th.read(os.path.join(root, "nd22_init"))
    th.assert_same_run(run, ref_init)
    th.assert_resumes_at_tp1(root, os.path.join(root, "ck"), run)


def test_ndmm_with_data_and_context_parallel_matches_one_process(root):
    run_world(_world4, 4, root, timeout_s=400)
    for name in ("nd12_dp2", "nd21_cp2_ring"):
        th.assert_same_run(th.read(os.path.join(root, name)), th.read(os.path.join(root, "ref")))


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("model", (*_nd(1, 2), "--ckpt-format", "torch"), "--use-nd-matmul with --ckpt-format torch is not implemented"),
        ("model", (*_nd(1, 2), "--sequence-parallel"), "--use-nd-matmul with --sequence-parallel is not implemented"),
        ("model", ("--use-nd-matmul",), "set --tensor-model-parallel-size 2 or more"),
        ("model", (*_nd(2, 2), "--tp-2d", "--tp-x", "2", "--tp-y", "1"), "tp_2d and use_nd_matmul are alternative"),
        ("moe", _nd(1, 2), "NDMM with MoE layers is not implemented; drop --use-nd-matmul"),
    ],
)  # fmt: skip
def test_unsupported_ndmm_launches_are_clear_errors(tmp_path, monkeypatch, model, extra, message):
    """Refused while the launch is validated, before any process group is made."""
    th.assert_launch_refused(str(tmp_path), monkeypatch, model, extra, message)
