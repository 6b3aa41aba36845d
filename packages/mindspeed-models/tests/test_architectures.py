"""The registry tables: shape of the data, and the defaults they record equal transformers' own."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mindspeed_models.architectures import ARCHITECTURES, GENERIC_IGNORED_KEYS, get_architecture, key_table


def test_registry_lists_the_architectures():
    assert sorted(ARCHITECTURES) == ["deepseek_v2", "deepseek_v3", "llama", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"]
    kinds = {"mixtral": "moe", "qwen2_moe": "moe", "qwen3_moe": "moe", "deepseek_v2": "mla_moe", "deepseek_v3": "mla_moe"}
    for name, arch in ARCHITECTURES.items():
        assert arch.model_type == name and arch.layer_kind == kinds.get(name, "dense")
        names = [k.name for k in arch.keys]
        assert len(names) == len(set(names)), f"{name}: duplicate keys"
        assert not set(names) & GENERIC_IGNORED_KEYS
        for k in arch.keys:
            assert k.target == "-" or k.target == "rope" or k.target.split(".")[0] in ("TransformerConfig", "ModelSpec")
            assert k.supported is None or k.default in k.supported, f"{name}.{k.name}: the HF default must be supported"
    assert ARCHITECTURES["qwen2"].qkv_bias and ARCHITECTURES["qwen3"].qk_norm
    assert not ARCHITECTURES["llama"].qkv_bias and not ARCHITECTURES["llama"].qk_norm


def test_get_architecture_errors():
    assert get_architecture("qwen3") is ARCHITECTURES["qwen3"]
    registered = "deepseek_v2, deepseek_v3, llama, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe"
    with pytest.raises(ValueError, match=f"registered architectures: {registered}"):
        get_architecture("gpt2")
    with pytest.raises(KeyError):
        ARCHITECTURES["llama"].key("use_sliding_window")


def test_key_table_has_one_row_per_key():
    rows = key_table()
    assert len(rows) == sum(len(a.keys) for a in ARCHITECTURES.values())
    row = next(r for r in rows if r["model_type"] == "llama" and r["key"] == "head_dim")
    assert row["default"] == "= hidden_size // num_attention_heads" and row["target"] == "TransformerConfig.kv_channels"
    hidden_act = next(r for r in rows if r["key"] == "hidden_act")
    assert hidden_act["supported"] == "'silu'"


def test_importing_the_tables_does_not_import_torch_or_megatron():
    code = "import mindspeed_models.architectures, sys; print('torch' in sys.modules, 'megatron' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_recorded_defaults_are_transformers_defaults(model_type):
    transformers = pytest.importorskip("transformers")
    hf_defaults = transformers.AutoConfig.for_model(model_type)
    for k in ARCHITECTURES[model_type].keys:
        if k.derived or k.name in ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "layer_types"):
            continue  # computed at config time (checked through the logits tests) or RoPE (moved into rope_parameters)
        if k.name == "sliding_window":
            assert type(hf_defaults).__dataclass_fields__["sliding_window"].default == k.default
            continue
        assert getattr(hf_defaults, k.name) == k.default, k.name
    assert hf_defaults.rope_parameters["rope_theta"] == ARCHITECTURES[model_type].key("rope_theta").default
