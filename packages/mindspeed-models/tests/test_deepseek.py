"""deepseek_v3 (MLA + DeepSeek MoE): logits of our GPTModel = transformers', the router alone = HF's, and the config mapping.

Tiny random HF models: 3 layers (layer 0 dense), hidden 64, 4 heads, q_lora 24, kv_lora 16,
qk_nope 16 / qk_rope 8 / v 12, 8 routed experts in 4 groups (top-2 groups, top-2 experts), one
shared expert, vocab 256, fp32, random router expert bias; a batch of two right-padded sequences
(lengths 10, 6) compared at the valid positions. Weights go in through a hand-written renaming
(below, independent of mindspeed_ckpt.maps) and through save_pretrained -> load_pretrained.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import models_hf_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)

import mindspeed_models as mm  # noqa: E402
from mindspeed_models.moe import SigmoidGroupRouter, SigmoidRouting, sigmoid_group_topk  # noqa: E402
from mindspeed_models.pretrained import load_state  # noqa: E402

TINY = dict(num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
            n_shared_experts=1, first_k_dense_replace=1, moe_intermediate_size=32, routed_scaling_factor=1.5,
            norm_topk_prob=True)  # fmt: skip
YARN = {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0, "rope_theta": 10000.0}  # fmt: skip
CASES = {
    "base": {},
    "no_norm_topk_scale_2.5": dict(norm_topk_prob=False, routed_scaling_factor=2.5),
    "yarn": dict(rope_parameters=YARN, max_position_embeddings=128),
    "no_q_lora_no_groups": dict(q_lora_rank=None, n_group=1, topk_group=1),
}
ATTN = {"o_proj": "linear_proj", "kv_a_proj_with_mqa": "linear_kv_down_proj", "kv_a_layernorm": "kv_layernorm",
        "kv_b_proj": "linear_kv_up_proj", "q_proj": "linear_q_proj", "q_a_proj": "linear_q_down_proj",
        "q_a_layernorm": "q_layernorm", "q_b_proj": "linear_q_up_proj"}  # fmt: skip


def tiny_deepseek(seed: int = 0, **overrides):
    """(config dict, fp32 eval HF DeepseekV3ForCausalLM) with random weights and a random router expert bias."""
    cfg, model = helpers.tiny_hf("deepseek_v3", seed=seed, **{**TINY, **overrides})
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # large enough to change which experts are chosen (sigmoid scores lie in (0, 1))
                buf.copy_(0.3 * torch.randn(buf.shape, generator=gen))
    return cfg, model


def naive_deepseek_state(cfg: dict, hf_model) -> dict[str, torch.Tensor]:
    """megatron state dict (TP=EP=1) of an HF deepseek_v3 model, renamed by hand from megatron's MLA/MoE names."""
    sd = hf_model.state_dict()
    out = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": sd["model.norm.weight"], "output_layer.weight": sd["lm_head.weight"]}  # fmt: skip
    for i in range(cfg["num_hidden_layers"]):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[mc + "input_layernorm.weight"] = sd[hf + "input_layernorm.weight"]
        out[mc + "pre_mlp_layernorm.weight"] = sd[hf + "post_attention_layernorm.weight"]
        for name, tensor in sd.items():
            if name.startswith(hf + "self_attn."):
                module, leaf = name.removeprefix(hf + "self_attn.").rsplit(".", 1)
                out[f"{mc}self_attention.{ATTN[module]}.{leaf}"] = tensor
        for src, dst in (("mlp.", "mlp."), ("mlp.shared_experts.", "mlp.shared_experts.")):
            if hf + src + "gate_proj.weight" in sd:
                gate_up = [sd[hf + src + "gate_proj.weight"], sd[hf + src + "up_proj.weight"]]
                out[mc + dst + "linear_fc1.weight"] = torch.cat(gate_up)
                out[mc + dst + "linear_fc2.weight"] = sd[hf + src + "down_proj.weight"]
        if hf + "mlp.gate.weight" in sd:
            out[mc + "mlp.router.weight"] = sd[hf + "mlp.gate.weight"]
            out[mc + "mlp.router.expert_bias"] = sd[hf + "mlp.gate.e_score_correction_bias"]
            fused = zip(sd[hf + "mlp.experts.gate_up_proj"], sd[hf + "mlp.experts.down_proj"], strict=True)
            for e, (fc1, fc2) in enumerate(fused):
                out[f"{mc}mlp.experts.local_experts.{e}.linear_fc1.weight"] = fc1
                out[f"{mc}mlp.experts.local_experts.{e}.linear_fc2.weight"] = fc2
    return out


def _ours(cfg: dict, hf_model, **overrides):
    with warnings.catch_warnings():
        # transformers' own config dicts must map without "key not read" warnings.
        warnings.filterwarnings("error", message="config.json keys not read")
        spec = mm.from_hf_config(cfg, perform_initialization=False, **overrides)
    model = mm.build_model(spec).eval()
    load_state(model, naive_deepseek_state(cfg, hf_model))
    return spec, model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    cfg, hf_model = tiny_deepseek(**CASES[case])
    _, model = _ours(cfg, hf_model)
    ids, mask = helpers.batch(cfg["vocab_size"])
    with torch.no_grad():
        ours = mm.logits(model, ids, mask)
    helpers.assert_logits_match(ours, helpers.hf_logits(hf_model, ids, mask), mask)


def test_load_pretrained_logits_match_transformers(tmp_path, caplog):
    pytest.importorskip("mindspeed_ckpt.maps")
    cfg, hf_model = tiny_deepseek(norm_topk_prob=False, routed_scaling_factor=2.5)
    hf_model.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mindspeed_models.config"):
        loaded = mm.load_pretrained(tmp_path)
    assert any("MTP layer(s) are not built" in r.getMessage() for r in caplog.records)
    assert loaded.spec.hf_config["num_nextn_predict_layers"] == 0 and loaded.spec.config.mtp_num_layers is None
    ids, mask = helpers.batch(cfg["vocab_size"])
    helpers.assert_logits_match(loaded.logits(ids, mask), helpers.hf_logits(hf_model, ids, mask), mask)


def test_load_pretrained_skips_mtp_tensors_as_transformers(tmp_path, caplog):
    """MTP layers are not built: their checkpoint tensors (layer num_hidden_layers + k) are skipped, as transformers
    skips them, with the warning saying so; the main model's logits are unchanged."""
    pytest.importorskip("mindspeed_ckpt.maps")
    from safetensors.torch import load_file, save_file

    cfg, hf_model = tiny_deepseek()
    hf_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.3.enorm.weight"] = torch.ones(64)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="mindspeed_models.config"):
        loaded = mm.load_pretrained(tmp_path)
    assert any("MTP layer(s) are not built" in r.getMessage() for r in caplog.records)
    ids, mask = helpers.batch(cfg["vocab_size"])
    helpers.assert_logits_match(loaded.logits(ids, mask), helpers.hf_logits(hf_model, ids, mask), mask)


def test_expert_bias_and_normalisation_change_the_logits():
    """The cases are sensitive to what they claim: the bias (selection), norm_topk_prob and the factor."""
    ids, mask = helpers.batch(256)
    cfg, hf_model = tiny_deepseek()
    base = helpers.hf_logits(hf_model, ids, mask)
    for layer in hf_model.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.zero_()
    assert (helpers.hf_logits(hf_model, ids, mask) - base).abs().max() > 1e-3
    _, other = tiny_deepseek(norm_topk_prob=False)
    assert (helpers.hf_logits(other, ids, mask) - base).abs().max() > 1e-3


@pytest.mark.parametrize("overrides", [{}, dict(norm_topk_prob=False, routed_scaling_factor=2.5), dict(num_experts_per_tok=1)])
def test_router_matches_hf_topk_router(overrides):
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds

    cfg, hf_model = tiny_deepseek(**overrides)
    spec, model = _ours(cfg, hf_model)
    ours = model.decoder.layers[1].mlp.router
    assert isinstance(ours, SigmoidGroupRouter) and ours.sigmoid_routing.normalize is cfg["norm_topk_prob"]
    hf_router = hf_model.model.layers[1].mlp.gate
    assert isinstance(hf_router, hf_ds.DeepseekV3TopkRouter)
    hidden = torch.randn(64, 1, cfg["hidden_size"], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        probs, routing_map = ours(hidden)
        _, weights, index = hf_router(hidden)
    expected = torch.zeros(64, 8).scatter(1, index, weights)
    assert torch.equal(routing_map, expected != 0)
    assert (probs - expected).abs().max().item() <= 1e-6
    # routes to several experts, never to a group outside each token's 2 chosen ones
    assert routing_map.any(0).sum() >= 4
    assert (routing_map.view(64, 4, 2).any(-1).sum(-1) <= 2).all()


def test_group_ranking_uses_two_best_scores():
    """HF ranks groups by their 2 best scores even when top-k / groups is 1 (megatron's rule would take 1)."""
    # group 0: (0.9, -inf-ish) -> best sum 0.9 + 0.0; group 1: (0.8, 0.8) -> 1.6
    logits = torch.logit(torch.tensor([[0.9, 1e-6, 0.8, 0.8]]))
    probs, routing_map = sigmoid_group_topk(
        logits, 1, num_groups=2, group_topk=1, expert_bias=None, scaling_factor=None, routing=SigmoidRouting()
    )
    assert routing_map.tolist() == [[False, False, True, False]] or routing_map.tolist() == [[False, False, False, True]]
    assert probs.sum().item() == pytest.approx(1.0)  # top-1 normalised to 1, as HF
    raw, _ = sigmoid_group_topk(logits, 1, num_groups=2, group_topk=1, expert_bias=None, scaling_factor=2.0,
                                routing=SigmoidRouting(normalize=False))  # fmt: skip
    assert raw.sum().item() == pytest.approx(1.6, rel=1e-5)


# --- config mapping ---------------------------------------------------------------------------

BASE = dict(model_type="deepseek_v3", hidden_size=64, intermediate_size=96, num_attention_heads=4,
            vocab_size=256, max_position_embeddings=128, **TINY)  # fmt: skip


def _spec(**keys):
    return mm.from_hf_config({**BASE, "num_nextn_predict_layers": 0, **keys})


def test_keys_map():
    spec = _spec()
    c = spec.config
    assert spec.architecture == "deepseek_v3" and c.multi_latent_attention
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim) == (24, 16, 16, 8, 12)
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size, c.ffn_hidden_size) == (8, 2, 32, 96)
    assert c.moe_shared_expert_intermediate_size == 32 and c.moe_layer_freq == [0, 1, 1]
    assert c.moe_router_score_function == "sigmoid" and c.moe_router_enable_expert_bias
    assert (c.moe_router_num_groups, c.moe_router_group_topk, c.moe_router_topk_scaling_factor) == (4, 2, 1.5)
    assert c.moe_router_load_balancing_type == "none" and c.moe_router_bias_update_rate == 1e-3
    assert c.moe_router_dtype == "fp32" and c.mtp_num_layers is None
    assert _spec(n_shared_experts=2).config.moe_shared_expert_intermediate_size == 64
    assert _spec(n_shared_experts=0).config.moe_shared_expert_intermediate_size is None
    assert _spec(first_k_dense_replace=0).config.moe_layer_freq == 1
    assert _spec(q_lora_rank=None).config.q_lora_rank is None
    yarn = _spec(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0,
                               "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}).config  # fmt: skip
    assert yarn.rope_type == "yarn" and yarn.rotary_scaling_factor == 4.0 and yarn.softmax_scale is None
    # the original DeepSeek-V3 config.json keys
    orig = _spec(scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1, aux_loss_alpha=0.001, seq_aux=True, ep_size=1)
    assert orig.config.moe_router_score_function == "sigmoid"


def test_layer_names():
    names = set(mm.build_model(_spec()).state_dict())
    assert "decoder.layers.0.mlp.linear_fc1.weight" in names and "decoder.layers.0.mlp.router.weight" not in names
    for key in ("self_attention.linear_q_down_proj.weight", "self_attention.q_layernorm.weight",
                "self_attention.linear_kv_down_proj.weight", "self_attention.kv_layernorm.weight",
                "mlp.router.weight", "mlp.router.expert_bias", "mlp.shared_experts.linear_fc1.weight",
                "mlp.shared_experts.linear_fc2.weight", "mlp.experts.local_experts.7.linear_fc2.weight"):  # fmt: skip
        assert f"decoder.layers.2.{key}" in names, key
    assert not any(n.startswith("mtp") for n in names)


def test_mtp_is_logged_not_built(caplog):
    with caplog.at_level(logging.WARNING, logger="mindspeed_models.config"):
        spec = mm.from_hf_config({**BASE, "num_nextn_predict_layers": 2})
    assert [r.getMessage() for r in caplog.records if "MTP" in r.getMessage()] == [
        "deepseek_v3: num_nextn_predict_layers=2 MTP layer(s) are not built (transformers does not run them); "
        "the model is the main 3-layer decoder only"
    ]
    assert spec.config.mtp_num_layers is None and spec.hf_config["num_nextn_predict_layers"] == 0


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"num_key_value_heads": 2}, "num_key_value_heads=2 must equal"),
        ({"rope_interleave": False}, "rope_interleave"),
        ({"attention_bias": True}, "attention_bias"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"topk_method": "greedy"}, "topk_method"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
        ({"n_group": 3}, "n_group=3 must divide"),
        ({"topk_group": 5}, "n_group=4 must divide n_routed_experts=8 and be >= topk_group=5"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok=5 must be <= topk_group"),
        ({"n_group": None}, "n_group=None"),
        ({"n_shared_experts": -1}, "n_shared_experts=-1"),
        ({"first_k_dense_replace": 3}, "first_k_dense_replace=3 leaves no MoE layer"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
        ({"kv_lora_rank": 0}, "kv_lora_rank"),
        ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "not supported for MLA"),
        ({"routed_scaling_factor": -1.0}, "routed_scaling_factor"),
    ],
)
def test_errors(keys, match):
    with pytest.raises(ValueError, match=match):
        _spec(**keys)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"mtp_num_layers": 1}, "mtp_num_layers=1 is not supported"),
        ({"moe_router_load_balancing_type": "aux_loss"}, "moe_router_load_balancing_type"),
        ({"moe_router_score_function": "softmax"}, "moe_router_score_function"),
    ],
)
def test_override_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        mm.from_hf_config({**BASE, "num_nextn_predict_layers": 0}, **overrides)
