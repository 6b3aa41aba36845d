"""from_hf_config: every mapped key, HF defaults, and the errors for unsupported values (no transformers needed)."""

from __future__ import annotations

import json
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

from mindspeed_models import from_hf_config
from mindspeed_models.config import read_hf_config

BASE = dict(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.01,
            rope_theta=1e6)  # fmt: skip


def cfg(model_type: str, **kw) -> dict:
    return {"model_type": model_type, **BASE, **kw}


def test_each_size_key_maps_to_its_field():
    spec = from_hf_config(cfg("llama", attention_dropout=0.125, tie_word_embeddings=True))
    c = spec.config
    assert (c.hidden_size, c.ffn_hidden_size, c.num_layers) == (48, 80, 3)
    assert (c.num_attention_heads, c.num_query_groups, c.kv_channels) == (6, 2, 8)
    assert c.layernorm_epsilon == 1e-5 and c.init_method_std == 0.01
    assert c.attention_dropout == 0.125 and c.hidden_dropout == 0.0
    assert spec.vocab_size == spec.padded_vocab_size == 300
    assert spec.max_position_embeddings == 512 and spec.tie_word_embeddings
    assert spec.architecture == "llama" and spec.hf_config["hidden_size"] == 48
    assert len(spec.layer_specs) == 3


def test_fixed_architecture_settings():
    c = from_hf_config(cfg("llama")).config
    assert c.normalization == "RMSNorm" and c.gated_linear_unit and c.activation_func is F.silu
    assert not c.add_bias_linear and not c.add_qkv_bias and not c.qk_layernorm
    assert c.window_size is None and c.softmax_scale is None
    assert from_hf_config(cfg("qwen2")).config.add_qkv_bias
    q3 = from_hf_config(cfg("qwen3", head_dim=20)).config
    assert q3.qk_layernorm and not q3.add_qkv_bias and q3.kv_channels == 20


def test_hf_defaults_when_keys_are_absent():
    minimal = {"model_type": "llama", "hidden_size": 48, "num_attention_heads": 6, "num_hidden_layers": 2,
               "intermediate_size": 64, "vocab_size": 100}  # fmt: skip
    spec = from_hf_config(minimal)
    assert spec.config.num_query_groups == 6 and spec.config.kv_channels == 8
    assert spec.config.layernorm_epsilon == 1e-6 and spec.max_position_embeddings == 2048
    assert spec.rope.base == 10000.0 and spec.rope.scaling is None and not spec.tie_word_embeddings
    q3 = from_hf_config({**minimal, "model_type": "qwen3", "num_key_value_heads": 2})
    assert q3.config.kv_channels == 128  # Qwen3's head_dim default does not follow hidden / heads
    q2 = from_hf_config({**minimal, "model_type": "qwen2", "num_key_value_heads": None})
    assert q2.config.num_query_groups == 6 and q2.max_position_embeddings == 32768


def test_rope_theta_both_spellings():
    assert from_hf_config(cfg("qwen2")).rope.base == 1e6
    v5 = cfg("qwen2", rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    del v5["rope_theta"]
    spec = from_hf_config(v5)
    assert spec.rope.base == 5e5 and spec.rope.rope_type == "default" and spec.rope.dim == 8


def test_llama3_rope_scaling_legacy_spelling():
    scaling = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # fmt: skip
    rope = from_hf_config(cfg("llama", rope_scaling=scaling)).rope
    assert rope.rope_type == "llama3" and rope.attention_factor == 1.0
    s = rope.scaling
    assert (s.kind, s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings) == (
        "llama3", 8.0, 1.0, 4.0, 64)  # fmt: skip
    # original_max_position_embeddings defaults to max_position_embeddings, as in transformers
    del scaling["original_max_position_embeddings"]
    assert from_hf_config(cfg("llama", rope_scaling=scaling)).rope.scaling.original_max_position_embeddings == 512


def test_yarn_attention_factor_goes_into_softmax_scale():
    spec = from_hf_config(cfg("qwen2", rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}))
    m = 0.1 * math.log(4.0) + 1.0
    assert spec.rope.attention_factor == pytest.approx(m)
    assert spec.config.softmax_scale == pytest.approx(m * m / math.sqrt(8))
    s = spec.rope.scaling
    assert (s.kind, s.factor, s.original_max_position_embeddings, s.beta_fast, s.beta_slow) == ("yarn", 4.0, 128, 32.0, 1.0)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"attention_factor": 1.5}, 1.5),
        ({"mscale": 0.5, "mscale_all_dim": 1.0}, (0.05 * math.log(4) + 1) / (0.1 * math.log(4) + 1)),
        ({"mscale": 0.5}, 0.1 * math.log(4) + 1),  # transformers uses the ratio only when both are set
    ],
)
def test_yarn_attention_factor_rules(params, expected):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, **params}
    assert from_hf_config(cfg("qwen2", rope_parameters=rope)).rope.attention_factor == pytest.approx(expected)


def test_yarn_factor_defaults_to_context_ratio():
    rope = {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 128}
    assert from_hf_config(cfg("qwen2", rope_parameters=rope)).rope.scaling.factor == 4.0


def test_sliding_window_from_legacy_keys_and_layer_types():
    legacy = from_hf_config(cfg("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)).config
    assert legacy.window_size == (15, 0) and legacy.window_attn_skip_freq == [0, 1, 1]
    all_layers = from_hf_config(cfg("qwen3", use_sliding_window=True, sliding_window=4, max_window_layers=0)).config
    assert all_layers.window_size == (3, 0) and all_layers.window_attn_skip_freq is None
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    explicit = from_hf_config(cfg("qwen2", use_sliding_window=True, sliding_window=8, layer_types=types)).config
    assert explicit.window_attn_skip_freq == [1, 0, 1]
    off = from_hf_config(cfg("qwen2", use_sliding_window=False, sliding_window=8, max_window_layers=0)).config
    assert off.window_size is None
    # as transformers: sliding layers without a window (use_sliding_window false) attend to everything
    no_window = cfg("qwen3", use_sliding_window=False, sliding_window=8, layer_types=types)
    assert from_hf_config(no_window).config.window_size is None


def test_overrides_and_vocab_padding():
    spec = from_hf_config(cfg("llama"), make_vocab_size_divisible_by=64, params_dtype=torch.bfloat16, num_layers=1)
    assert spec.padded_vocab_size == 320 and spec.vocab_size == 300
    assert spec.config.params_dtype == torch.bfloat16 and spec.config.num_layers == 1 and len(spec.layer_specs) == 1
    tp = from_hf_config(cfg("llama"), make_vocab_size_divisible_by=64, tensor_model_parallel_size=2)
    assert tp.padded_vocab_size == 384


def test_spec_is_frozen():
    spec = from_hf_config(cfg("llama"))
    with pytest.raises(AttributeError):
        spec.vocab_size = 1
    with pytest.raises(TypeError):
        spec.hf_config["vocab_size"] = 1
    clone = pickle.loads(pickle.dumps(spec))  # specs travel to spawned ranks
    assert clone.hf_config == spec.hf_config and clone.config.hidden_size == 48


def test_reads_a_file_or_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(cfg("qwen3")))
    assert from_hf_config(tmp_path).architecture == "qwen3"
    assert from_hf_config(str(tmp_path / "config.json")).architecture == "qwen3"
    with pytest.raises(FileNotFoundError, match="config"):
        read_hf_config(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_hf_config(tmp_path / "bad.json")
    with pytest.raises(TypeError, match="config must be"):
        read_hf_config(42)


def test_unknown_model_type_names_the_registered_ones():
    registered = "deepseek_v2, deepseek_v3, llama, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe"
    with pytest.raises(ValueError, match=rf"model_type='mistral' is not supported; registered architectures: {registered}"):
        from_hf_config(cfg("mistral"))
    with pytest.raises(ValueError, match="model_type=None"):
        from_hf_config(BASE)


@pytest.mark.parametrize(
    ("model_type", "extra", "match"),
    [
        ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ("llama", {"attention_bias": True}, "attention_bias=True and mlp_bias=False must be equal"),
        ("qwen3", {"attention_bias": True}, "attention_bias=True is not supported"),
        ("llama", {"mlp_bias": True}, "attention_bias=False and mlp_bias=True must be equal"),
        ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
        ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not implemented"),
        ("llama", {"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope type 'longrope' is not implemented"),
        ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear' is not implemented"),
        ("qwen2", {"rope_scaling": {"type": "yarn", "factor": 2.0, "truncate": False}}, "truncate=false"),
        ("qwen2", {"rope_scaling": {"type": "yarn", "factor": 2.0, "foo": 1}}, r"rope parameters \['foo'\]"),
        ("llama", {"rope_scaling": {"type": "llama3", "factor": 8.0}}, "low_freq_factor=None must be a number"),
        ("llama", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config is set"),
        ("llama", {"num_key_value_heads": 4}, "num_key_value_heads=4 must divide num_attention_heads=6"),
        ("llama", {"hidden_size": 50, "head_dim": None}, "not a multiple of num_attention_heads"),
        ("llama", {"hidden_size": 0}, "hidden_size=0 must be a positive integer"),
        ("llama", {"rms_norm_eps": "x"}, "rms_norm_eps='x' must be a finite number"),
        ("llama", {"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes' must be true or false"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 0, "max_window_layers": 0}, "sliding_window=0"),
        ("qwen2", {"use_sliding_window": True, "layer_types": ["full_attention"]}, "layer_types="),
    ],
)
def test_unsupported_values_are_errors(model_type, extra, match):
    with pytest.raises(ValueError, match=match):
        from_hf_config(cfg(model_type, **extra))


def test_bad_overrides():
    with pytest.raises(TypeError, match="unknown override.*not_a_field"):
        from_hf_config(cfg("llama"), not_a_field=1)
    with pytest.raises(ValueError, match="make_vocab_size_divisible_by=0"):
        from_hf_config(cfg("llama"), make_vocab_size_divisible_by=0)


def test_unknown_keys_warn_and_known_generic_keys_do_not():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_hf_config(cfg("qwen2", torch_dtype="bfloat16", architectures=["Qwen2ForCausalLM"], use_cache=True,
                           bos_token_id=1, eos_token_id=2, transformers_version="4.45.0"))  # fmt: skip
    with pytest.warns(UserWarning, match="keys not read for llama.*: fancy_new_key"):
        from_hf_config(cfg("llama", fancy_new_key=3))
