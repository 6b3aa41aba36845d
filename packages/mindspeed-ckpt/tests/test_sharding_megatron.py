"""``sharding.tp_dim`` against megatron-core's own parameter attributes: every parameter of tiny
local-spec GPTModels (MLA with and without q LoRA, shared experts with a gate, MTP, biases)
is split along ``partition_dim`` when megatron tags it ``tensor_model_parallel`` and replicated
otherwise; routed experts (megatron's ``is_expert`` linears, split over the expert-TP group) are
whole at expert TP 1."""

import sys
from pathlib import Path

import pytest

from mindspeed_ckpt.sharding import tp_dim

pytest.importorskip("megatron.core")
sys.path.insert(0, str(Path(__file__).parent / "maps"))
from ckpt_tiny_configs import CONFIGS, SYNTHETIC_ONLY  # noqa: E402
from test_mcore_names import _build, mcore_world  # noqa: E402,F401  (mcore_world is a fixture)


@pytest.mark.parametrize("key", ["llama_bias", "qwen2_moe", "deepseek_v2", "deepseek_v3", "deepseek_v3_tied_mtp2"])
def test_tp_dim_matches_megatron_partition_dim(key, mcore_world):  # noqa: F811
    model = _build({**CONFIGS, **SYNTHETIC_ONLY}[key])
    experts = {f"{m}.{n}" for m, mod in model.named_modules() if getattr(mod, "is_expert", False)
               for n, _ in mod.named_parameters(recurse=False)}
    assert any(".shared_experts." not in n for n in experts) == (key != "llama_bias")
    seen = 0
    for name, p in model.named_parameters():
        if name in experts:
            assert ".mlp.experts.local_experts." in name and tp_dim(name) is None, name
            continue
        expected = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        assert tp_dim(name) == expected, name
        seen += expected is not None
    assert seen > 5  # not vacuous: column- and row-parallel weights were compared
