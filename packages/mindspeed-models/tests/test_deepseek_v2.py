"""deepseek_v2 (MLA + DeepSeek-V2 MoE: softmax scores, greedy or group-limited greedy top-k, no renormalisation):
logits of our GPTModel = transformers' DeepseekV2ForCausalLM, the router alone = DeepseekV2TopkRouter, key errors.

Tiny random HF models (3 layers, layer 0 dense, hidden 64, 4 heads, q_lora 24, kv_lora 16, qk_nope 16 / qk_rope 8 /
v 12, 8 routed experts top-2, two shared experts, vocab 256, fp32); two right-padded sequences compared at the valid
positions; weights through the hand-written renaming of test_deepseek.py and through save_pretrained -> load_pretrained.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import models_hf_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)
from test_deepseek import YARN, naive_deepseek_state  # noqa: E402

import mindspeed_models as mm  # noqa: E402
from mindspeed_models.moe import DeepSeekRouter, DeepSeekRouting, deepseek_topk  # noqa: E402
from mindspeed_models.pretrained import load_state  # noqa: E402

TINY = dict(num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
            first_k_dense_replace=1, moe_intermediate_size=32, routed_scaling_factor=1.0)  # fmt: skip
GROUPED = dict(topk_method="group_limited_greedy", n_group=4, topk_group=2)
CASES = {
    "greedy": {},
    "group_limited_scale_2": dict(GROUPED, routed_scaling_factor=2.0),
    "yarn_no_q_lora": dict(rope_parameters=YARN, max_position_embeddings=128, q_lora_rank=None),
    "all_moe_top1": dict(first_k_dense_replace=0, num_experts_per_tok=1),
}


def tiny_v2(seed: int = 0, **overrides):
    return helpers.tiny_hf("deepseek_v2", seed=seed, **{**TINY, **overrides})


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    cfg, hf_model = tiny_v2(**CASES[case])
    spec = mm.from_hf_config(cfg, perform_initialization=False)
    assert spec.config.moe_router_score_function == "softmax" and not spec.config.moe_router_enable_expert_bias
    assert spec.config.mtp_num_layers is None
    model = mm.build_model(spec).eval()
    load_state(model, naive_deepseek_state(cfg, hf_model))
    ids, mask = helpers.batch(cfg["vocab_size"])
    with torch.no_grad():
        ours = mm.logits(model, ids, mask)
    helpers.assert_logits_match(ours, helpers.hf_logits(hf_model, ids, mask), mask)


def test_load_pretrained_logits_match_transformers(tmp_path):
    pytest.importorskip("mindspeed_ckpt.maps")
    cfg, hf_model = tiny_v2(**GROUPED)
    hf_model.save_pretrained(tmp_path)
    loaded = mm.load_pretrained(tmp_path)
    ids, mask = helpers.batch(cfg["vocab_size"])
    helpers.assert_logits_match(loaded.logits(ids, mask), helpers.hf_logits(hf_model, ids, mask), mask)


@pytest.mark.parametrize("overrides", [{}, GROUPED, dict(GROUPED, num_experts_per_tok=3, routed_scaling_factor=16.0)])
def test_router_matches_hf_topk_router(overrides):
    """deepseek_topk with V2 routing = transformers' DeepseekV2TopkRouter: same experts, same weights."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg, _ = tiny_v2(**overrides)
    hf_router = DeepseekV2TopkRouter(type(_).config_class(**cfg))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        hf_router.weight.copy_(torch.randn(hf_router.weight.shape, generator=gen))
    x = torch.randn(40, cfg["hidden_size"], generator=gen)
    logits, hf_weights, hf_index = hf_router(x)
    grouped = cfg.get("topk_method") == "group_limited_greedy"
    probs, routing_map = deepseek_topk(
        logits,
        cfg["num_experts_per_tok"],
        num_groups=cfg["n_group"] if grouped else None,
        group_topk=cfg["topk_group"] if grouped else None,
        expert_bias=None,
        scaling_factor=cfg["routed_scaling_factor"],
        routing=DeepSeekRouting("softmax", False, 1),
    )
    expected = torch.zeros_like(probs).scatter(1, hf_index, hf_weights)
    assert torch.equal(routing_map, expected != 0)
    torch.testing.assert_close(probs, expected, rtol=0, atol=0)


def test_group_limited_greedy_ranks_groups_by_their_best_score():
    """V2 ranks a group by its single best score (V3 would sum two): a group with one high score beats a group
    with two middling ones."""
    logits = torch.tensor([[4.0, -9.0, 3.7, 3.7, -9.0, -9.0, -9.0, -9.0]])  # e^4 > e^3.7, but 2 e^3.7 > e^4
    v2 = DeepSeekRouting("softmax", False, 1)
    v3_like = DeepSeekRouting("softmax", False, 2)
    kwargs = dict(num_groups=4, group_topk=1, expert_bias=None, scaling_factor=None)
    _, v2_map = deepseek_topk(logits, 1, routing=v2, **kwargs)
    _, v3_map = deepseek_topk(logits, 1, routing=v3_like, **kwargs)
    assert v2_map[0].nonzero().flatten().tolist() == [0] and v3_map[0].nonzero().flatten().tolist() == [2]


def test_router_module_is_the_deepseek_router():
    cfg, _ = tiny_v2(**GROUPED)
    model = mm.build_model(mm.from_hf_config(cfg))
    router = model.decoder.layers[1].mlp.router
    assert isinstance(router, DeepSeekRouter) and router.expert_bias is None
    assert router.deepseek_routing == DeepSeekRouting("softmax", False, 1)
    assert not hasattr(model.decoder.layers[0].mlp, "router")


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ({"norm_topk_prob": True}, "norm_topk_prob"),
        ({"topk_method": "noaux_tc"}, "topk_method"),
        ({"scoring_func": "sigmoid"}, "scoring_func"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"topk_method": "group_limited_greedy", "n_group": None, "topk_group": 2}, "n_group=None"),
        ({"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 2}, "n_group=3 must divide"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok=9 must be <= n_routed_experts=8"),
    ],
)
def test_errors(keys, match):
    cfg = {"model_type": "deepseek_v2", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
           "vocab_size": 256, "max_position_embeddings": 128, **TINY, **keys}  # fmt: skip
    with pytest.raises(ValueError, match=match):
        mm.from_hf_config(cfg)


def test_softmax_override_errors():
    cfg, _ = tiny_v2()
    with pytest.raises(ValueError, match="moe_router_score_function='sigmoid' is not supported for deepseek_v2"):
        mm.from_hf_config(cfg, moe_router_score_function="sigmoid")
