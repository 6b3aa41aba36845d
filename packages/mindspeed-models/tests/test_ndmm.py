"""NDMM models (mindspeed_models.ndmm) equal the unparallelised model (gloo, worlds 2 and 4).

For tiny llama (q/k/v/o and MLP biases), qwen2 (qkv biases, GQA) and qwen3 (per-head q/k norms)
configs at TP 4 with (nd1, nd2) = (4, 2), (2, 2), (1, 4) and at TP 2 with (1, 2), (2, 1), (2, 2): host-side
initial weights are this rank's NDMM shards of the TP=1 model's; with random weights loaded shard by
shard, logits, loss and every gradient equal the TP=1 model's; torch_dist keys and global shapes
match (grid_model_checks). The shard of a weight is written here from the layout MindSpeed uses
(rows: the OUT/tp blocks x, x + d1, ...; columns: block y of d2), independently of the library.
"""

from __future__ import annotations

import grid_model_checks as checks  # noqa: E402  (tests/conftest.py puts it on sys.path)
import pytest
import torch

from mindspeed_kernels.testing import run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]


def _linear_block(module, pname: str, full: torch.Tensor) -> torch.Tensor:
    g, tp, stride = module.grid, module.tp, module.stride
    fragments = full.chunk(stride * tp, dim=0)  # megatron's rows: `stride` parts ([gate | up]) of tp blocks
    if pname == "bias":
        t = g.y * g.tp_x + g.x
        return torch.cat([fragments[s * tp + t] for s in range(stride)])
    rows = torch.cat([fragments[s * tp + m * g.tp_x + g.x] for m in range(g.tp_y) for s in range(stride)])
    cols = full.shape[1] // g.tp_y
    return rows[:, g.y * cols : (g.y + 1) * cols]


def _block(module, pname: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of the full (TP=1) tensor ``full`` for parameter ``pname`` of ``module``."""
    from mindspeed_models.ndmm import NdLinear, NdNorm

    if isinstance(module, NdLinear):
        return _linear_block(module, pname, full)
    if isinstance(module, NdNorm):
        return full.reshape(module.tp, -1)[module.t]
    vocab = checks.vocab_block(module, full)
    return full if vocab is None else vocab


def _check(model_type: str, tp: int, nd1: int, nd2: int) -> None:
    from megatron.core import parallel_state as ps

    from mindspeed_models.ndmm import enable_ndmm, make_ndmm_settings

    def enable(spec):
        return enable_ndmm(spec, make_ndmm_settings(ps.get_tensor_model_parallel_group(), nd1, nd2))

    hf = checks.hf_config(model_type, num_key_value_heads=tp)  # query groups split over the TP group
    checks.check_against_tp1(hf, tp, enable, _block, f"{model_type} tp={tp} nd1={nd1} nd2={nd2}")


# every model type and every shape of grid once: (d1, d2) of 2x2, 1x4, 4x1, 1x2 and 2x1, equal and
# different grids for the first and second matmuls
CASES = {4: (("llama", 4, 2), ("qwen2", 2, 2), ("qwen3", 1, 4)), 2: (("llama", 1, 2), ("qwen2", 2, 1), ("qwen3", 2, 2))}


def _world(rank: int, tp: int) -> None:
    checks.setup()
    for model_type, nd1, nd2 in CASES[tp]:
        _check(model_type, tp, nd1, nd2)


def test_ndmm_tp4_equals_tp1():
    run_world(_world, 4, 4, timeout_s=280)


def test_ndmm_tp2_equals_tp1():
    run_world(_world, 2, 2, timeout_s=240)


def test_unsupported_models_are_refused():
    """MoE models and query groups that do not split over the TP group stop with a one-line error."""
    import mindspeed_models as mm
    from mindspeed_models.ndmm import NDMMSettings, enable_ndmm
    from mindspeed_parallel.tp2d import Grid2D, TP2DGroups

    groups = TP2DGroups(grid=Grid2D((0, 1), 1, 2), x_group=None, y_group=None, x=0, y=0)
    settings = NDMMSettings(groups, groups, None)
    moe = mm.from_hf_config({"model_type": "qwen3_moe", **checks.SIZES, "head_dim": 8, "num_experts": 4,
                             "num_experts_per_tok": 2, "moe_intermediate_size": 16}, tensor_model_parallel_size=2)  # fmt: skip
    with pytest.raises(ValueError, match="NDMM with MoE layers is not implemented; drop --use-nd-matmul"):
        enable_ndmm(moe, settings)
    gqa = mm.from_hf_config({**checks.hf_config("qwen2"), "num_key_value_heads": 1}, tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="num_query_groups=1 must divide by the tensor-parallel size=2"):
        enable_ndmm(gqa, settings)
