"""TP-2D models (mindspeed_models.tp2d) equal the unparallelised model (gloo, worlds 2 and 4).

For tiny llama (q/k/v/o and MLP biases), qwen2 (qkv biases, GQA) and qwen3 (per-head q/k norms)
configs, on grids 2x2 (world 4), 1x2 and 2x1 (world 2):

- host-side initialisation: with the same seed, every TP-2D parameter is exactly this rank's block
  of the TP=1 model's parameter (so both start from the same function);
- with random weights (norms near 1, random biases) loaded from the TP=1 model: logits [B, S, V],
  the mean LM loss and, after one backward through megatron's DDP and ``finalize_model_grads``,
  every gradient (this rank's block of the reference gradient) equal the TP=1 model's;
- the torch_dist sharded state dict has megatron's keys and global shapes.

Reference: megatron-core's own GPTModel with our plain specs in the same processes.
"""

from __future__ import annotations

import grid_model_checks as checks  # noqa: E402  (tests/conftest.py puts it on sys.path)
import pytest
import torch

from mindspeed_kernels.testing import run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]


def _block(module, pname: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's block of the full (TP=1) tensor ``full`` for parameter ``pname`` of ``module``."""
    from mindspeed_models.tp2d import Linear2D, Norm2D

    if isinstance(module, Linear2D):
        rows = torch.cat(full.split(module.out_features // (module.ag_size * module.stride))[module.a :: module.ag_size])
        if pname == "bias":
            return rows
        cols = module.in_features // module.rs_size
        return rows[:, module.r * cols : (module.r + 1) * cols]
    if isinstance(module, Norm2D):
        return full.reshape(module.tp_y, -1)[module.y]
    vocab = checks.vocab_block(module, full)
    return full if vocab is None else vocab


def _check(model_type: str, grid: tuple[int, int]) -> None:
    from megatron.core import parallel_state as ps

    from mindspeed_models.tp2d import enable_tp2d, make_settings

    def enable(spec):
        return enable_tp2d(spec, make_settings(ps.get_tensor_model_parallel_group(), *grid))

    checks.check_against_tp1(checks.hf_config(model_type), grid[0] * grid[1], enable, _block,
                             f"{model_type} {grid[0]}x{grid[1]}")  # fmt: skip


def _world4(rank: int) -> None:
    checks.setup()
    for model_type in checks.CONFIGS:
        _check(model_type, (2, 2))


def _world2(rank: int) -> None:
    checks.setup()
    for model_type in checks.CONFIGS:
        for grid in ((1, 2), (2, 1)):
            _check(model_type, grid)


def test_tp2d_2x2_equals_tp1():
    run_world(_world4, 4, timeout_s=240)


def test_tp2d_1x2_and_2x1_equal_tp1():
    run_world(_world2, 2, timeout_s=240)


def test_unsupported_models_are_refused():
    """MoE models stop with a one-line error naming the feature (no process groups needed)."""
    import mindspeed_models as mm
    from mindspeed_models.tp2d import TP2DSettings, enable_tp2d
    from mindspeed_parallel.tp2d import Grid2D, TP2DGroups

    spec = mm.from_hf_config({"model_type": "qwen3_moe", **checks.SIZES, "head_dim": 8, "num_experts": 4,
                              "num_experts_per_tok": 2, "moe_intermediate_size": 16})  # fmt: skip
    settings = TP2DSettings(TP2DGroups(grid=Grid2D((0,), 1, 1), x_group=None, y_group=None, x=0, y=0))
    with pytest.raises(ValueError, match="TP-2D with MoE layers is not implemented"):
        enable_tp2d(spec, settings)
