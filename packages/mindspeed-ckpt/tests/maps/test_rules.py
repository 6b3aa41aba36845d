"""Rule expansion, whole-dict round trips and error cases on synthetic tensors (torch and
safetensors only: this file runs in the package's isolated environment)."""

import re
from dataclasses import FrozenInstanceError

import pytest
import torch
from ckpt_tiny_configs import CONFIGS, SYNTHETIC_ONLY, random_hf_tensors
from safetensors import safe_open
from safetensors.torch import save_file

from mindspeed_ckpt.maps import ARCHITECTURES, apply_hf_to_mcore, hf_to_mcore, layout, mcore_to_hf, rules

ALL = {**CONFIGS, **SYNTHETIC_ONLY}


def test_registry_covers_the_required_families():
    required = {"llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3"}
    assert required <= set(ARCHITECTURES)
    assert set(CONFIGS) >= set(ARCHITECTURES)  # every registered family has a tiny config here
    for model_type, arch in ARCHITECTURES.items():
        assert arch.model_type == model_type


def test_unknown_model_type_names_it_and_the_supported_ones():
    with pytest.raises(ValueError) as e:
        rules(dict(CONFIGS["llama"], model_type="gpt_oss"))
    msg = str(e.value)
    assert "'gpt_oss'" in msg and all(m in msg for m in ARCHITECTURES)


def test_bad_configs():
    with pytest.raises(TypeError, match="to_dict"):
        rules(object())
    cfg = dict(CONFIGS["llama"])
    del cfg["hidden_size"]
    with pytest.raises(ValueError, match="'hidden_size'"):
        rules(cfg)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        rules(dict(CONFIGS["llama"], num_key_value_heads=3))
    with pytest.raises(ValueError, match="attention_bias"):
        rules(dict(CONFIGS["deepseek_v3"], attention_bias=True))
    with pytest.raises(ValueError, match="padded_vocab_size"):
        rules(CONFIGS["llama"], padded_vocab_size=95)


def test_llama_rules_by_hand():
    rs = rules(CONFIGS["llama"], padded_vocab_size=128)
    assert len(rs) == 1 + 2 * 6 + 2
    by_mcore = {r.mcore: r for r in rs}
    qkv = by_mcore["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert qkv.hf == tuple(f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv")
    assert qkv.hf_shapes == ((32, 32), (16, 32), (16, 32)) and qkv.mcore_shape == (64, 32)
    assert dict(qkv.params) == {"heads": 4, "groups": 2, "head_dim": 8}
    fc1 = by_mcore["decoder.layers.0.mlp.linear_fc1.weight"]
    assert fc1.hf == ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight")
    assert fc1.mcore_shape == (96, 32)
    assert by_mcore["embedding.word_embeddings.weight"].mcore_shape == (128, 32)
    assert by_mcore["output_layer.weight"].hf == ("lm_head.weight",)
    assert by_mcore["decoder.layers.0.pre_mlp_layernorm.weight"].hf == ("model.layers.0.post_attention_layernorm.weight",)
    with pytest.raises(FrozenInstanceError):
        qkv.mcore = "x"
    hash(qkv)


@pytest.mark.parametrize("name", sorted(ALL))
def test_names_are_unique(name):
    rs = rules(ALL[name])
    owned = [r.mcore for r in rs if not r.alias]
    assert len(owned) == len(set(owned))
    hf = [n for r in rs for n in r.hf]
    assert len(hf) == len(set(hf))
    assert {r.mcore for r in rs if r.alias} <= set(owned)


def test_feature_rows():
    names = lambda key: {r.mcore for r in rules(ALL[key])}
    assert "decoder.layers.0.self_attention.linear_qkv.bias" in names("qwen2")
    assert "decoder.layers.0.self_attention.linear_proj.bias" not in names("qwen2")
    assert {"decoder.layers.0.self_attention.linear_proj.bias", "decoder.layers.0.mlp.linear_fc1.bias"} <= names("llama_bias")
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in names("qwen3")
    assert "output_layer.weight" not in names("qwen2")  # tied
    assert "decoder.layers.1.mlp.shared_experts.gate_weight" in names("qwen2_moe")
    v2 = names("deepseek_v2")
    assert "decoder.layers.0.self_attention.linear_q_proj.weight" in v2
    assert not any("q_down_proj" in n or "expert_bias" in n or n.startswith("mtp.") for n in v2)


@pytest.mark.parametrize("key,moe", [("mixtral", {0, 1}), ("qwen3_moe", {0, 2}), ("qwen2_moe", {1}),
                                     ("deepseek_v2", {1}), ("deepseek_v3", {1, 2, 3})])
def test_moe_layer_selection(key, moe):
    assert set(layout(CONFIGS[key]).moe_layers) == moe
    router = re.compile(r"decoder\.layers\.(\d+)\.mlp\.router\.weight")
    routers = {int(m.group(1)) for r in rules(CONFIGS[key]) if (m := router.match(r.mcore))}
    assert routers == moe - {layout(CONFIGS[key]).num_layers}  # the MTP layer's router lives under mtp.


def test_deepseek_v3_mtp_rules():
    rs = rules(SYNTHETIC_ONLY["deepseek_v3_tied_mtp2"])
    mtp = [r for r in rs if r.hf[0].startswith(("model.layers.3.", "model.layers.4."))]
    by_hf = {r.hf[0]: r for r in mtp}
    assert by_hf["model.layers.4.eh_proj.weight"].mcore == "mtp.layers.1.eh_proj.weight"
    assert by_hf["model.layers.4.eh_proj.weight"].hf_shapes == ((32, 64),)
    assert by_hf["model.layers.3.shared_head.norm.weight"].mcore == "mtp.layers.0.final_layernorm.weight"
    assert by_hf["model.layers.3.mlp.gate.e_score_correction_bias"].mcore == \
        "mtp.layers.0.transformer_layer.mlp.router.expert_bias"
    for k in (3, 4):  # tied: both copies alias the embedding
        assert by_hf[f"model.layers.{k}.embed_tokens.weight"].alias
        assert by_hf[f"model.layers.{k}.shared_head.head.weight"].mcore == "embedding.word_embeddings.weight"
    assert all(r.mcore.startswith(("mtp.layers.", "embedding.")) for r in mtp)


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [None, 128])
@pytest.mark.parametrize("name", sorted(ALL))
def test_round_trip_is_bit_identical(name, padded, dtype):
    cfg = ALL[name]
    hf = random_hf_tensors(cfg, dtype)
    mc = hf_to_mcore(cfg, hf, padded_vocab_size=padded)
    assert set(mc) == {r.mcore for r in rules(cfg) if not r.alias}
    rows = padded or cfg["vocab_size"]
    assert mc["embedding.word_embeddings.weight"].shape == (rows, 32)
    assert not mc["embedding.word_embeddings.weight"][cfg["vocab_size"]:].any()
    _assert_same(mcore_to_hf(cfg, mc), hf)


def test_tied_lm_head_is_accepted_checked_and_not_written():
    cfg = CONFIGS["qwen2"]
    hf = random_hf_tensors(cfg, with_optional=True)
    assert "lm_head.weight" in hf
    back = mcore_to_hf(cfg, hf_to_mcore(cfg, hf))
    assert "lm_head.weight" not in back
    hf["lm_head.weight"] = hf["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="'lm_head.weight' differs"):
        hf_to_mcore(cfg, hf)


def test_mtp_copy_must_equal_the_embedding():
    cfg = CONFIGS["deepseek_v3"]
    hf = random_hf_tensors(cfg)
    hf["model.layers.3.embed_tokens.weight"] = torch.zeros_like(hf["model.layers.3.embed_tokens.weight"])
    with pytest.raises(ValueError, match="'model.layers.3.embed_tokens.weight' differs"):
        hf_to_mcore(cfg, hf)


def test_missing_and_extra_hf_tensors():
    cfg = CONFIGS["qwen3"]
    hf = random_hf_tensors(cfg)
    del hf["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(ValueError, match=r"missing Hugging Face tensor 'model.layers.1.self_attn.k_norm.weight' "
                                         r"\(for megatron 'decoder.layers.1.self_attention.k_layernorm.weight'\)"):
        hf_to_mcore(cfg, hf)
    hf = random_hf_tensors(cfg)
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # HF skips these: so do we
    hf["model.layers.0.mlp.extra.weight"] = torch.ones(4)
    with pytest.raises(ValueError, match="unexpected Hugging Face tensor 'model.layers.0.mlp.extra.weight'"):
        hf_to_mcore(cfg, hf)


def test_missing_mtp_layers_say_how_to_skip_them():
    cfg = CONFIGS["deepseek_v3"]
    hf = {k: v for k, v in random_hf_tensors(cfg).items() if not k.startswith("model.layers.3.")}
    with pytest.raises(ValueError, match="num_nextn_predict_layers=1.*set it to 0"):
        hf_to_mcore(cfg, hf)
    no_mtp = dict(cfg, num_nextn_predict_layers=0)
    mc = hf_to_mcore(no_mtp, hf)
    assert not any(k.startswith("mtp.") for k in mc)
    # a checkpoint that has them converts without MTP too: HF itself ignores those layers
    assert hf_to_mcore(no_mtp, random_hf_tensors(cfg)).keys() == mc.keys()


def test_wrong_shapes():
    cfg = CONFIGS["llama"]
    hf = random_hf_tensors(cfg)
    hf["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(8, 32)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.v_proj.weight' has shape \(8, 32\), expected \(16, 32\)"):
        hf_to_mcore(cfg, hf)
    mc = hf_to_mcore(cfg, random_hf_tensors(cfg), padded_vocab_size=128)
    mc["decoder.layers.1.mlp.linear_fc2.weight"] = torch.zeros(32, 40)
    with pytest.raises(ValueError, match=r"'decoder.layers.1.mlp.linear_fc2.weight' has shape \(32, 40\), expected \(32, 48\)"):
        mcore_to_hf(cfg, mc)
    mc = hf_to_mcore(cfg, random_hf_tensors(cfg), padded_vocab_size=128)
    mc["output_layer.weight"] = mc["output_layer.weight"][:120]  # padded differently from the embedding
    with pytest.raises(ValueError, match="'output_layer.weight' has shape"):
        mcore_to_hf(cfg, mc)
    mc["embedding.word_embeddings.weight"] = mc["embedding.word_embeddings.weight"][:90]
    with pytest.raises(ValueError, match="fewer than hf_config vocab_size=96"):
        mcore_to_hf(cfg, mc)


def test_mcore_names_checked_and_extra_state_ignored():
    cfg = CONFIGS["mixtral"]
    mc = hf_to_mcore(cfg, random_hf_tensors(cfg))
    mc["decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
    assert mcore_to_hf(cfg, mc).keys() == random_hf_tensors(cfg).keys()
    mc["decoder.layers.0.self_attention.core_attention.scale"] = torch.ones(1)
    with pytest.raises(ValueError, match="unexpected megatron tensor 'decoder.layers.0.self_attention.core_attention.scale'"):
        mcore_to_hf(cfg, mc)
    del mc["decoder.layers.0.self_attention.core_attention.scale"]
    del mc["decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"]
    with pytest.raises(ValueError, match=r"missing megatron tensor 'decoder\.layers\.1\.mlp\.experts\.local_experts\.3\."):
        mcore_to_hf(cfg, mc)


def test_streaming_through_safetensors(tmp_path):
    """Rule by rule, pulling HF tensors lazily from a safetensors file, and writing the inverse
    back with safetensors (which refuses tensors that share storage)."""
    cfg = SYNTHETIC_ONLY["deepseek_v3_tied_mtp2"]
    hf = random_hf_tensors(cfg, torch.bfloat16)
    save_file(hf, tmp_path / "model.safetensors")
    pulled = []
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        def get(name):
            pulled.append(name)
            return f.get_tensor(name)
        streamed = {}
        for rule in rules(cfg, padded_vocab_size=100):
            if rule.optional and not set(rule.hf) <= set(f.keys()):
                continue
            name, t = apply_hf_to_mcore(rule, get)
            if not rule.alias:
                streamed[name] = t
    assert sorted(pulled) == sorted(hf)  # each HF tensor read exactly once
    _assert_same(streamed, hf_to_mcore(cfg, hf, padded_vocab_size=100))
    back = mcore_to_hf(cfg, streamed)
    save_file(back, tmp_path / "back.safetensors")
    with safe_open(tmp_path / "back.safetensors", "pt") as f:
        _assert_same({k: f.get_tensor(k) for k in f.keys()}, hf)
