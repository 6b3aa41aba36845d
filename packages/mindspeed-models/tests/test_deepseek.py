"""deepseek_v3 (MLA + DeepSeek MoE): logits of our GPTModel = transformers', the router alone = HF's, and the config mapping.

Tiny random HF models: 3 layers (layer 0 dense), hidden 64, 4 heads, q_lora 24, kv_lora 16,
qk_nope 16 / qk_rope 8 / v 12, 8 routed experts in 4 groups (top-2 groups, top-2 experts), one
shared expert, vocab 256, fp32, random router expert bias; a batch of two right-padded sequences
(lengths 10, 6) compared at the valid positions. Weights go in through a hand-written renaming
(below, independent of mindspeed_ckpt.maps) and through save_pretrained -> load_pretrained.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import models_hf_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)

import mindspeed_models as mm  # noqa: E402
from mindspeed_models.moe import DeepSeekRouter, DeepSeekRouting, deepseek_topk  # noqa: E402
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
            if hf + "mlp.gate.e_score_correction_bias" in sd:  # DeepSeek-V3 only
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
        # the main model only: transformers has no MTP layer to compare with (tests/test_mtp.py does MTP)
        spec = mm.from_hf_config(cfg, perform_initialization=False, **{"mtp_num_layers": 0, **overrides})
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


def test_load_pretrained_logits_match_transformers(tmp_path):
    """save_pretrained writes no MTP layer: load_pretrained builds the main model (tests/test_mtp.py covers MTP)."""
    pytest.importorskip("mindspeed_ckpt.maps")
    cfg, hf_model = tiny_deepseek(norm_topk_prob=False, routed_scaling_factor=2.5)
    hf_model.save_pretrained(tmp_path)
    loaded = mm.load_pretrained(tmp_path)
    assert loaded.spec.hf_config["num_nextn_predict_layers"] == 0 and loaded.spec.config.mtp_num_layers is None
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
    assert isinstance(ours, DeepSeekRouter) and ours.deepseek_routing.normalize is cfg["norm_topk_prob"]
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
    probs, routing_map = deepseek_topk(
        logits, 1, num_groups=2, group_topk=1, expert_bias=None, scaling_factor=None, routing=DeepSeekRouting()
    )
    assert routing_map.tolist() == [[False, False, True, False]] or routing_map.tolist() == [[False, False, False, True]]
    assert probs.sum().item() == pytest.approx(1.0)  # top-1 normalised to 1, as HF
    raw, _ = deepseek_topk(logits, 1, num_groups=2, group_topk=1, expert_bias=None, scaling_factor=2.0,
                                routing=DeepSeekRouting(normalize=False))  # fmt: skip
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
        ({"moe_router_load_balancing_type": "sinkhorn"}, "moe_router_load_balancing_type"),
        ({"moe_router_score_function": "softmax"}, "moe_router_score_function"),
    ],
)
def test_override_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        mm.from_hf_config({**BASE, "num_nextn_predict_layers": 0}, **overrides)


def _naive_balance_loss(logits: torch.Tensor, topk: int, coeff: float, seq: int | None) -> torch.Tensor:
    """DeepSeek-V3 report eq. 17-20: alpha * sum_i f_i P_i with s' = sigmoid scores normalised over the experts,
    f_i = E / (k T) * #(tokens whose unbiased top-k holds i), P_i = mean_t s'_i; per sequence of ``seq`` tokens
    (averaged over the sequences) or over all tokens (``seq`` None). ``logits`` [S*B, E] in megatron's s-major order."""
    experts = logits.shape[-1]
    scores = torch.sigmoid(logits)
    scores = scores / scores.sum(-1, keepdim=True)
    chosen = torch.zeros_like(scores).scatter(1, scores.topk(topk, dim=-1).indices, 1.0)
    if seq is None:
        scores, chosen = scores[:, None], chosen[:, None]
    else:  # [S*B, E] -> [S, B, E]: token t of sequence b is row t * B + b
        scores, chosen = scores.view(seq, -1, experts), chosen.view(seq, -1, experts)
    tokens = scores.shape[0]
    f = experts / (topk * tokens) * chosen.sum(0)
    p = scores.mean(0)
    return coeff * (f * p).sum(-1).mean()


@pytest.mark.parametrize("kind", ["aux_loss", "seq_aux_loss"])
def test_balance_losses_match_the_deepseek_formula(kind):
    """Our router with megatron's balance losses: the logged value and the router-weight gradient it adds equal
    the DeepSeek-V3 formula differentiated by autograd (main loss zero, so only the balance loss has a gradient)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    coeff, seq, bsz = 0.01, 6, 3
    spec = mm.from_hf_config(
        {**BASE, "num_nextn_predict_layers": 0}, moe_router_load_balancing_type=kind, moe_aux_loss_coeff=coeff
    )
    router = mm.build_model(spec).train().decoder.layers[1].mlp.router
    assert isinstance(router, DeepSeekRouter)
    x = torch.randn(seq, bsz, BASE["hidden_size"], generator=torch.Generator().manual_seed(8))
    clear_aux_losses_tracker()
    probs, _ = router(x)
    (probs * 0).sum().backward()

    weight = router.weight.detach().clone().requires_grad_()
    expected = _naive_balance_loss(x.view(-1, x.shape[-1]) @ weight.t(), 2, coeff, seq if kind == "seq_aux_loss" else None)
    expected.backward()
    torch.testing.assert_close(router.weight.grad, weight.grad, rtol=1e-5, atol=1e-9)
    assert weight.grad.abs().sum() > 0
    name = "seq_load_balancing_loss" if kind == "seq_aux_loss" else "load_balancing_loss"
    logged = get_moe_layer_wise_logging_tracker()[name]["values"][router.layer_number - 1]
    torch.testing.assert_close(logged, expected.detach() / coeff, rtol=1e-5, atol=1e-7)


def test_capacity_factor_drops_tokens_over_capacity():
    """moe_expert_capacity_factor 0.5: each expert keeps at most ceil(T k / E * 0.5) of the tokens that chose it
    (the highest-probability ones, megatron's default drop policy); kept choices are a subset of the undropped ones."""
    x = torch.randn(16, 2, BASE["hidden_size"], generator=torch.Generator().manual_seed(9))
    maps = []
    for factor in (None, 0.5):
        torch.manual_seed(0)  # the same router weights in both models
        router = mm.build_model(_spec_with(moe_expert_capacity_factor=factor)).decoder.layers[1].mlp.router
        with torch.no_grad():
            probs, routing_map = router(x)
        maps.append((probs, routing_map))
    (full_probs, full_map), (probs, kept) = maps
    capacity = math.ceil(32 * 2 / 8 * 0.5)
    assert kept.sum(0).max() <= capacity < full_map.sum(0).max()
    assert not (kept & ~full_map).any() and kept.sum() < full_map.sum()
    for e in range(8):  # the kept tokens of an expert are its highest-probability ones
        chosen = full_probs[full_map[:, e], e]
        assert torch.equal(probs[kept[:, e], e].sort().values, chosen.sort().values[-int(kept[:, e].sum()):])


def _spec_with(**overrides):
    return mm.from_hf_config({**BASE, "num_nextn_predict_layers": 0}, **overrides)
