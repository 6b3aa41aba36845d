"""MoE architectures (qwen2_moe, qwen3_moe, mixtral): logits of our GPTModel = transformers', and the config mapping.

Tiny random HF models: 2 layers, 8 experts, top-2, 4 query / 2 KV heads, hidden 64, vocab 256,
fp32; a batch of two right-padded sequences (lengths 10, 6) compared at the valid positions.
Weights go in through a hand-written renaming (models_hf_helpers.naive_moe_state) and through
save_pretrained -> load_pretrained (mindspeed_ckpt.maps).
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import models_hf_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)

import mindspeed_models as mm  # noqa: E402
from mindspeed_models.moe import GroupedSwiGLUExperts  # noqa: E402
from mindspeed_models.pretrained import load_state  # noqa: E402

QWEN3_MOE = dict(helpers.MOE_SIZES, moe_intermediate_size=48)
QWEN2_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80)
CASES = {
    "qwen3_moe": ("qwen3_moe", QWEN3_MOE, {}),
    "qwen3_moe_norm_topk_prob": ("qwen3_moe", dict(QWEN3_MOE, norm_topk_prob=True), {}),
    "qwen3_moe_dense_layer0_allgather": (
        "qwen3_moe", dict(QWEN3_MOE, mlp_only_layers=[0]), {"moe_token_dispatcher_type": "allgather"},
    ),
    "qwen2_moe_gated_shared_expert": ("qwen2_moe", dict(QWEN2_MOE), {}),
    "qwen2_moe_norm_topk_dense_layer1": ("qwen2_moe", dict(QWEN2_MOE, norm_topk_prob=True, mlp_only_layers=[1]), {}),
    "mixtral": ("mixtral", dict(helpers.MOE_SIZES), {}),
    "mixtral_grouped_gemm": ("mixtral", dict(helpers.MOE_SIZES), {"moe_grouped_gemm": True}),
    "mixtral_kernel_permute_grouped_gemm": (
        "mixtral", dict(helpers.MOE_SIZES), {"moe_grouped_gemm": True, "moe_permute_fusion": True},
    ),
    "qwen3_moe_kernel_permute_allgather": (
        "qwen3_moe", QWEN3_MOE, {"moe_permute_fusion": True, "moe_token_dispatcher_type": "allgather"},
    ),
}  # fmt: skip


def _ours(hf_config: dict, hf_model, **overrides):
    with warnings.catch_warnings():
        # transformers' own config dicts must map without "key not read" warnings.
        warnings.filterwarnings("error", message="config.json keys not read")
        spec = mm.from_hf_config(hf_config, perform_initialization=False, **overrides)
    model = mm.build_model(spec).eval()
    load_state(model, helpers.naive_moe_state(hf_config, hf_model, spec.padded_vocab_size))
    return spec, model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    model_type, hf_overrides, overrides = CASES[case]
    hf_config, hf_model = helpers.tiny_hf(model_type, **hf_overrides)
    spec, model = _ours(hf_config, hf_model, **overrides)
    ids, mask = helpers.batch(hf_config["vocab_size"])
    with torch.no_grad():
        ours = mm.logits(model, ids, mask)
    helpers.assert_logits_match(ours, helpers.hf_logits(hf_model, ids, mask), mask)


def test_qwen2_moe_shared_expert_gate_maps():
    """qwen2_moe: the shared expert and its sigmoid gate are megatron's gated SharedExpertMLP; qkv biases on."""
    hf_config, _ = helpers.tiny_hf("qwen2_moe", **QWEN2_MOE)
    config = mm.from_hf_config(hf_config).config
    assert config.moe_shared_expert_intermediate_size == 80 and config.moe_shared_expert_gate
    assert config.add_qkv_bias and config.moe_router_pre_softmax
    with pytest.raises(ValueError, match="layer_types"):
        mm.from_hf_config({**hf_config, "layer_types": ["sliding_attention", "full_attention"]})
    with pytest.raises(ValueError, match="qkv_bias"):
        mm.from_hf_config({**hf_config, "qkv_bias": False})


def test_routing_is_exercised():
    """The qwen3_moe cases differ in routing (renormalised or not), and route to several experts."""
    ids, mask = helpers.batch(256)
    logits = {}
    for norm in (False, True):
        cfg, hf_model = helpers.tiny_hf("qwen3_moe", **QWEN3_MOE, norm_topk_prob=norm)
        logits[norm] = helpers.hf_logits(hf_model, ids, mask)
        spec, model = _ours(cfg, hf_model)
        assert spec.config.moe_router_pre_softmax is (not norm)
    assert (logits[False] - logits[True]).abs().max() > 1e-2
    cfg, hf_model = helpers.tiny_hf("qwen3_moe", **QWEN3_MOE)
    _, model = _ours(cfg, hf_model)
    router = model.decoder.layers[0].mlp.router
    with torch.no_grad():
        hidden = torch.randn(16, 1, cfg["hidden_size"])
        probs, routing_map = router(hidden)
    assert routing_map.sum(-1).eq(2).all() and routing_map.any(0).sum() >= 4


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "mixtral"])
def test_load_pretrained_logits_match_transformers(model_type, tmp_path):
    pytest.importorskip("mindspeed_ckpt.maps")
    overrides = {"qwen3_moe": QWEN3_MOE, "qwen2_moe": QWEN2_MOE}.get(model_type, helpers.MOE_SIZES)
    _, hf_model = helpers.tiny_hf(model_type, **overrides)
    hf_model.save_pretrained(tmp_path)
    loaded = mm.load_pretrained(tmp_path)
    assert loaded.spec.architecture == model_type
    ids, mask = helpers.batch(hf_model.config.vocab_size)
    helpers.assert_logits_match(loaded.logits(ids, mask), helpers.hf_logits(hf_model, ids, mask), mask)


# --- config mapping ---------------------------------------------------------------------------

BASE = {
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=48),
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256, num_local_experts=8,
                    num_experts_per_tok=2),
}  # fmt: skip


def _config(model_type: str, **keys):
    return mm.from_hf_config({**BASE[model_type], **keys}).config


def test_qwen3_moe_keys_map():
    c = _config("qwen3_moe", router_aux_loss_coef=0.01, output_router_logits=True)
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size, c.ffn_hidden_size) == (8, 2, 48, 96)
    assert c.moe_router_score_function == "softmax" and c.moe_router_pre_softmax  # norm_topk_prob defaults to false
    assert c.moe_aux_loss_coeff == 0.01 and c.moe_token_dispatcher_type == "alltoall" and not c.moe_grouped_gemm
    assert c.moe_layer_freq == 1 and c.qk_layernorm and not c.add_qkv_bias and c.kv_channels == 16
    assert not _config("qwen3_moe", norm_topk_prob=True).moe_router_pre_softmax
    # transformers 5 spelling, and both spellings agreeing
    assert _config("qwen3_moe", num_experts=None, num_local_experts=6).num_moe_experts == 6
    assert _config("qwen3_moe", num_local_experts=8).num_moe_experts == 8
    assert _config("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2).moe_layer_freq == [0, 1, 0, 1]
    assert _config("qwen3_moe", mlp_only_layers=[1]).moe_layer_freq == [1, 0]
    assert _config("qwen3_moe", sliding_window=4096, use_sliding_window=False).window_size is None


def test_mixtral_keys_map():
    c = _config("mixtral", router_aux_loss_coef=0.02)
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size) == (8, 2, 96)
    assert not c.moe_router_pre_softmax and c.moe_aux_loss_coeff == 0.02 and not c.qk_layernorm
    assert c.layernorm_epsilon == 1e-5  # mixtral's default
    assert _config("mixtral", num_local_experts=None, num_experts=4).num_moe_experts == 4
    spec = mm.from_hf_config({**BASE["mixtral"], "rope_parameters": None})
    assert spec.rope.base == 1e6  # mixtral's default theta
    assert _config("mixtral", router_jitter_noise=0.0).num_moe_experts == 8


def test_moe_spec_builds_sequential_mlp_names():
    spec = mm.from_hf_config({**BASE["qwen3_moe"], "mlp_only_layers": [0]})
    names = set(mm.build_model(spec).state_dict())
    assert "decoder.layers.0.mlp.linear_fc1.weight" in names and "decoder.layers.0.mlp.router.weight" not in names
    assert "decoder.layers.1.mlp.router.weight" in names
    for e in range(8):
        for fc in ("linear_fc1", "linear_fc2"):
            assert f"decoder.layers.1.mlp.experts.local_experts.{e}.{fc}.weight" in names


@pytest.mark.parametrize(
    ("model_type", "keys", "match"),
    [
        ("qwen3_moe", {"num_experts_per_tok": 9}, "num_experts_per_tok=9 must be <="),
        ("qwen3_moe", {"num_experts_per_tok": 0}, "num_experts_per_tok=0"),
        ("qwen3_moe", {"num_experts": 8, "num_local_experts": 4}, "disagree"),
        ("qwen3_moe", {"num_experts": 0}, "num_experts=0"),
        ("qwen3_moe", {"moe_intermediate_size": -1}, "moe_intermediate_size=-1"),
        ("qwen3_moe", {"norm_topk_prob": "yes"}, "norm_topk_prob"),
        ("qwen3_moe", {"mlp_only_layers": [0, 1]}, "no MoE layer"),
        ("qwen3_moe", {"mlp_only_layers": [5]}, "mlp_only_layers"),
        ("qwen3_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step=0"),
        ("qwen3_moe", {"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size=64"),
        ("qwen3_moe", {"use_sliding_window": True}, "use_sliding_window=True"),
        ("qwen3_moe", {"attention_bias": True}, "attention_bias=True"),
        ("qwen3_moe", {"router_aux_loss_coef": -1.0}, "router_aux_loss_coef"),
        ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
        ("mixtral", {"sliding_window": 4096}, "sliding_window=4096"),
        ("mixtral", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ],
)
def test_unsupported_values_raise(model_type, keys, match):
    with pytest.raises(ValueError, match=match):
        mm.from_hf_config({**BASE[model_type], **keys})


def test_moe_overrides():
    spec = mm.from_hf_config(BASE["mixtral"], moe_token_dispatcher_type="allgather")
    assert spec.config.moe_token_dispatcher_type == "allgather"
    with pytest.raises(ValueError, match="moe_token_dispatcher_type='flex'"):
        mm.from_hf_config(BASE["mixtral"], moe_token_dispatcher_type="flex")
    spec = mm.from_hf_config(BASE["mixtral"], moe_grouped_gemm=True)
    assert isinstance(mm.build_model(spec).decoder.layers[0].mlp.experts, GroupedSwiGLUExperts)


# --- expert parallelism -----------------------------------------------------------------------


def _load_ep_shard(model, full: dict[str, torch.Tensor]) -> None:
    """Copy a full (EP=1) state into an EP-sharded model: local expert e of EP rank r is global r * n_local + e."""
    import re

    from megatron.core import parallel_state as ps

    n_local = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
    first = ps.get_expert_model_parallel_rank() * n_local

    def global_name(name: str) -> str:
        return re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{first + int(m.group(1))}.", name)

    load_state(model, {name: full[global_name(name)] for name in model.state_dict() if not name.endswith("_extra_state")})


def _ep_world(rank: int) -> None:
    from megatron.core import parallel_state as ps

    from mindspeed_kernels.testing import assert_close

    hf_config, hf_model = helpers.tiny_hf("qwen3_moe", **QWEN3_MOE)  # same seed: the same model on both ranks
    ids, mask = helpers.batch(hf_config["vocab_size"], seed=3 + rank)  # different tokens per rank: they cross ranks
    ps.initialize_model_parallel()  # no RNG seeding needed: weights are loaded, eval, no dropout
    spec = mm.from_hf_config(hf_config, perform_initialization=False)
    full = helpers.naive_moe_state(hf_config, hf_model, spec.padded_vocab_size)
    ref = mm.build_model(spec).eval()
    load_state(ref, full)
    with torch.no_grad():
        ref_logits = mm.logits(ref, ids, mask)
    helpers.assert_logits_match(ref_logits, helpers.hf_logits(hf_model, ids, mask), mask)

    for dispatcher, grouped in (("alltoall", False), ("allgather", False), ("alltoall", True)):
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(expert_model_parallel_size=2)
        spec = mm.from_hf_config(
            hf_config,
            perform_initialization=False,
            expert_model_parallel_size=2,
            moe_token_dispatcher_type=dispatcher,
            moe_grouped_gemm=grouped,
        )
        model = mm.build_model(spec).eval()
        assert len(model.decoder.layers[0].mlp.experts.local_experts) == 4, "EP=2 holds half of the 8 experts"
        _load_ep_shard(model, full)
        with torch.no_grad():
            logits = mm.logits(model, ids, mask)
        valid = mask.bool()
        assert_close(logits[valid], ref_logits[valid])
        assert torch.equal(logits[valid].argmax(-1), ref_logits[valid].argmax(-1))
    ps.destroy_model_parallel()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.xdist_group("gloo")
def test_expert_parallel_2_matches_1():
    """Our qwen3_moe at EP=2 (alltoall and allgather dispatchers; grouped GEMM experts) gives the EP=1
    logits, themselves = transformers'."""
    from mindspeed_kernels.testing import run_world

    run_world(_ep_world, 2, timeout_s=120)


def test_grouped_gemm_experts_equal_sequential_mlp():
    """GroupedSwiGLUExperts = megatron's SequentialMLP on the same weights: outputs and gradients,
    with an expert that receives no token."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    spec = mm.from_hf_config(BASE["qwen3_moe"], moe_grouped_gemm=True)
    grouped = mm.build_model(spec).decoder.layers[0].mlp.experts
    sequential = mm.build_model(mm.from_hf_config(BASE["qwen3_moe"])).decoder.layers[0].mlp.experts
    assert type(sequential) is SequentialMLP and set(grouped.state_dict()) == set(sequential.state_dict())
    sequential.load_state_dict(grouped.state_dict())
    gen = torch.Generator().manual_seed(5)
    counts = torch.tensor([3, 0, 5, 1, 2, 4, 0, 6])
    x = torch.randn(int(counts.sum()), 64, generator=gen)
    probs = torch.rand(int(counts.sum()), generator=gen)
    outs = []
    for experts in (grouped, sequential):
        xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()
        out, bias = experts(xi, counts, pi)
        assert bias is None
        out.pow(2).sum().backward()
        outs.append((out.detach(), xi.grad, pi.grad, {n: p.grad for n, p in experts.named_parameters()}))
    (o1, gx1, gp1, gw1), (o2, gx2, gp2, gw2) = outs
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gp1, gp2, rtol=1e-5, atol=1e-6)
    for name in gw1:
        torch.testing.assert_close(gw1[name], gw2[name], rtol=1e-5, atol=1e-6)
