"""TP-2D through `mindspeed train` (``launch.train``): ``--tp-2d --tp-x X --tp-y Y`` trains the tiny
qwen2 (GQA, qkv biases) with the losses (1e-5) and gradient norms (1e-4) of the one-process TP=1 run
over 4 steps, on grids 2x2 (world 4; also with each overlap option, and from a TP=1 checkpoint),
1x2 and 2x1 (world 2) and 1x2 x DP=2 with the distributed optimizer (world 4). Host-side
initialisation makes the 2-D shards independent of the layout, like megatron's TP shards; the
checkpoint runs start from one TP=1 checkpoint (``--load INIT --finetune``). A 2x2 run's torch_dist
checkpoint resumes at TP=1 (model and optimizer resharded) on the same curve. Every run pads the
vocabulary to a multiple of 64 x TP (256 for TP 1, 2 and 4), so all layouts have the same logits.
"""

from __future__ import annotations

import os

import pytest
import train_helpers as th

from mindspeed_kernels.testing import run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(600), pytest.mark.slow]


def _grid(x: int, y: int) -> tuple[str, ...]:
    return ("--tp-2d", "--tp-x", str(x), "--tp-y", str(y), "--tensor-model-parallel-size", str(x * y))


def _world4(rank: int, root: str) -> None:
    from megatron.core import parallel_state as ps

    th.grid_train(root, "2x2", _grid(2, 2))
    assert (ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size()) == (4, 1)
    th.grid_train(root, "2x2_ag", (*_grid(2, 2), "--enable-overlap-ag-with-matmul", "--enable-backward-overlap-ag-with-matmul"))
    ck = os.path.join(root, "ck2x2")
    th.grid_train(root, "2x2_rs_init", (*_grid(2, 2), "--enable-overlap-matmul-with-rs", *th.init_flags(root),
                                        "--save", ck, "--save-interval", "2"))  # fmt: skip
    th.grid_train(root, "1x2_dp2", (*_grid(1, 2), "--use-distributed-optimizer"))
    assert (ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size()) == (2, 2)


def _world2(rank: int, root: str) -> None:
    th.grid_train(root, "1x2", _grid(1, 2))
    th.grid_train(root, "2x1_init", (*_grid(2, 1), *th.init_flags(root)))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tp2d"))
    th.prepare(path)
    run_world(th.grid_reference_world, 1, path, timeout_s=200)
    return path


def test_tp2d_2x2_and_dp_match_one_process(root):
    run_world(_world4, 4, root, timeout_s=500)
    ref, ref_init = th.read(os.path.join(root, "ref")), th.read(os.path.join(root, "ref_init"))
    for name in ("2x2", "2x2_ag", "1x2_dp2"):
        th.assert_same_run(th.read(os.path.join(root, name)), ref)
    run = th.read(os.path.join(root, "2x2_rs_init"))
    th.assert_same_run(run, ref_init)
    th.assert_resumes_at_tp1(root, os.path.join(root, "ck2x2"), run)


def test_tp2d_1x2_and_2x1_match_one_process(root):
    run_world(_world2, 2, root, timeout_s=300)
    th.assert_same_run(th.read(os.path.join(root, "1x2")), th.read(os.path.join(root, "ref")))
    th.assert_same_run(th.read(os.path.join(root, "2x1_init")), th.read(os.path.join(root, "ref_init")))


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("model", (*_grid(1, 2), "--ckpt-format", "torch"), "--tp-2d with --ckpt-format torch is not implemented"),
        ("model", (*_grid(1, 2), "--recompute-activation-function"), "--tp-2d with recomputation"),
        ("model", (*_grid(1, 2), "--enable-overlap-ag-with-matmul", "--enable-overlap-matmul-with-rs"), "are alternatives"),
        ("moe", _grid(1, 2), "TP-2D with MoE layers is not implemented; drop --tp-2d"),
    ],
)  # fmt: skip
def test_unsupported_tp2d_launches_are_clear_errors(tmp_path, monkeypatch, model, extra, message):
    """Refused while the launch is validated, before any process group is made."""
    th.assert_launch_refused(str(tmp_path), monkeypatch, model, extra, message)
