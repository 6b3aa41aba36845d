"""MLA (megatron's MLASelfAttention built from our spec) against HF transformers' DeepseekV3Attention."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mindspeed_models.runtime import ensure_parallel_state

transformers = pytest.importorskip("transformers")
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec, build_module  # noqa: E402
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig  # noqa: E402
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds  # noqa: E402

from mindspeed_models.mla import (  # noqa: E402
    MLAFlashAttention,
    disable_mocked_te,
    mla_config_fields,
    mla_layer_spec,
    mla_self_attention_spec,
)

HIDDEN, HEADS, KV_LORA, NOPE, ROPE, V_DIM = 64, 4, 16, 16, 8, 12
YARN = {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 32, "beta_fast": 32.0, "beta_slow": 1.0, "rope_theta": 10000.0}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def megatron_state():
    from mindspeed_models.adaptor import install

    install()
    ensure_parallel_state()


def hf_config(q_lora: int | None, rope: dict | None):
    rope = rope or {"rope_type": "default", "rope_theta": 10000.0}
    cfg = transformers.DeepseekV3Config(
        hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS, q_lora_rank=q_lora,
        kv_lora_rank=KV_LORA, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V_DIM,
        max_position_embeddings=128, rope_parameters=dict(rope), attention_dropout=0.0, rms_norm_eps=1e-6,
        num_hidden_layers=1, first_k_dense_replace=1, vocab_size=128, intermediate_size=128, moe_intermediate_size=32,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    return cfg


def megatron_config(hf_cfg) -> MLATransformerConfig:
    fields = mla_config_fields(hf_cfg.to_dict())
    return MLATransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=4 * HIDDEN,
        layernorm_epsilon=hf_cfg.rms_norm_eps, add_bias_linear=False, attention_dropout=0.0, hidden_dropout=0.0,
        use_cpu_initialization=True, params_dtype=torch.float32, cuda_graph_scope=[], **fields,
    )  # fmt: skip


def build_pair(q_lora: int | None, rope: dict | None, **spec_options):
    """(HF attention, megatron MLASelfAttention) with the same random weights."""
    torch.manual_seed(0)
    hf_cfg = hf_config(q_lora, rope)
    hf_attn = hf_ds.DeepseekV3Attention(hf_cfg, layer_idx=0).eval()
    with torch.no_grad():  # non-trivial norm weights so the latent norms are exercised
        for norm in (hf_attn.q_a_layernorm, hf_attn.kv_a_layernorm):
            if norm is not None:
                norm.weight.uniform_(0.5, 1.5)
    mc_attn = build_module(mla_self_attention_spec(**spec_options), config=megatron_config(hf_cfg), layer_number=1)
    names = HF_TO_MC
    ours = dict(mc_attn.named_parameters())
    copied = set()
    with torch.no_grad():
        for name, param in hf_attn.named_parameters():
            module, leaf = name.rsplit(".", 1)
            target = f"{names[module]}.{leaf}"
            assert ours[target].shape == param.shape, target
            ours[target].copy_(param)
            copied.add(target)
    assert copied == set(ours), f"megatron parameters left uncopied: {set(ours) - copied}"
    return hf_attn, mc_attn.eval(), hf_cfg


HF_TO_MC = {"o_proj": "linear_proj", "kv_a_proj_with_mqa": "linear_kv_down_proj", "kv_a_layernorm": "kv_layernorm",
             "kv_b_proj": "linear_kv_up_proj", "q_proj": "linear_q_proj", "q_a_proj": "linear_q_down_proj",
             "q_a_layernorm": "q_layernorm", "q_b_proj": "linear_q_up_proj"}  # fmt: skip


@pytest.mark.parametrize("q_lora", [24, None])
def test_names_follow_mindspeed_ckpt_deepseek_map(q_lora):
    """mindspeed_ckpt's DeepSeek-V3 rules (written against megatron's names) load our module exactly."""
    maps = pytest.importorskip("mindspeed_ckpt.maps")
    hf_attn, mc_attn, hf_cfg = build_pair(q_lora, YARN)
    hf_prefix, mc_prefix = "model.layers.0.self_attn.", "decoder.layers.0.self_attention."
    hf_tensors = {hf_prefix + n: p.detach() for n, p in hf_attn.named_parameters()}
    ours = dict(mc_attn.named_parameters())
    loaded = {}
    for rule in maps.rules(hf_cfg.to_dict()):
        if rule.mcore.startswith(mc_prefix) and all(n.startswith(hf_prefix) for n in rule.hf):
            name, tensor = maps.apply_hf_to_mcore(rule, hf_tensors.__getitem__)
            loaded[name.removeprefix(mc_prefix)] = tensor
    assert set(loaded) == set(ours)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, ours[name].detach()), name


def hf_forward(hf_attn, hf_cfg, x: torch.Tensor) -> torch.Tensor:
    """x [B, S, H] -> [B, S, H], causal, positions 0..S-1."""
    batch, seq = x.shape[:2]
    positions = torch.arange(seq)[None].expand(batch, -1)
    cos_sin = hf_ds.DeepseekV3RotaryEmbedding(hf_cfg)(x, positions)
    mask = torch.full((seq, seq), float("-inf")).triu(1)[None, None].expand(batch, 1, -1, -1)
    out, _ = hf_attn(x, position_embeddings=cos_sin, attention_mask=mask)
    return out


def mc_forward(mc_attn, x: torch.Tensor) -> torch.Tensor:
    out, bias = mc_attn(x.transpose(0, 1), attention_mask=None)
    assert bias is None
    return out.transpose(0, 1)


def inputs(seq: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("q_lora", [24, None])
@pytest.mark.parametrize("rope", [None, YARN], ids=["rope", "yarn"])
def test_matches_hf_deepseek_v3_attention(q_lora, rope):
    hf_attn, mc_attn, hf_cfg = build_pair(q_lora, rope)
    x = inputs(seq=40)  # longer than YaRN's original 32 positions
    with torch.no_grad():
        expected = hf_forward(hf_attn, hf_cfg, x)
        got = mc_forward(mc_attn, x)
    assert (got - expected).abs().max().item() <= 1e-5


def test_softmax_scale_includes_yarn_mscale():
    _, mc_attn, _ = build_pair(24, YARN)
    mscale = 0.1 * 1.0 * math.log(4.0) + 1.0
    assert mc_attn.core_attention.softmax_scale == pytest.approx((NOPE + ROPE) ** -0.5 * mscale**2, rel=1e-12)
    _, plain, _ = build_pair(24, None)
    assert plain.core_attention.softmax_scale == pytest.approx((NOPE + ROPE) ** -0.5, rel=1e-12)


@pytest.mark.parametrize("options", [dict(padded_base_length=1), dict(mla_fa_without_pad=True), dict(padded_base_length=16)])
def test_padding_options_are_neutral(options):
    hf_attn, mc_attn, hf_cfg = build_pair(None, YARN, **options)
    x = inputs(seq=12)
    with torch.no_grad():
        expected = hf_forward(hf_attn, hf_cfg, x)
        got = mc_forward(mc_attn, x)
    assert (got - expected).abs().max().item() <= 1e-5


def test_backward_matches_hf_gradients():
    hf_attn, mc_attn, hf_cfg = build_pair(24, YARN)
    x = inputs(seq=10)
    x_hf, x_mc = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
    hf_forward(hf_attn, hf_cfg, x_hf).backward(grad)
    mc_forward(mc_attn, x_mc).backward(grad)
    assert torch.isfinite(x_mc.grad).all()
    assert (x_mc.grad - x_hf.grad).abs().max().item() <= 1e-5
    hf_grads = {n.rsplit(".", 1)[0]: p.grad for n, p in hf_attn.named_parameters()}
    mc_grads = {n.rsplit(".", 1)[0]: p.grad for n, p in mc_attn.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in mc_grads.values())
    assert (mc_grads["linear_kv_up_proj"] - hf_grads["kv_b_proj"]).abs().max().item() <= 1e-5
    assert (mc_grads["q_layernorm"] - hf_grads["q_a_layernorm"]).abs().max().item() <= 1e-5


def test_layer_spec_swaps_self_attention_only():
    base = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(self_attention="placeholder"))
    spec = mla_layer_spec(base, padded_base_length=64)
    assert base.submodules.self_attention == "placeholder"
    attention = spec.submodules.self_attention
    assert attention.params == {"attn_mask_type": AttnMaskType.causal}
    assert attention.submodules.core_attention.module is MLAFlashAttention
    assert attention.submodules.core_attention.params["padded_base_length"] == 64
    with pytest.raises(TypeError, match="layer_spec"):
        mla_layer_spec(ModuleSpec(module=TransformerLayer))


def test_unsupported_spec_options():
    with pytest.raises(ValueError, match="mla_mm_split"):
        mla_self_attention_spec(mla_mm_split=True)
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True,
                               attention_dropout=0.0, cuda_graph_scope=[])  # fmt: skip
    with pytest.raises(ValueError, match="padded_base_length"):
        MLAFlashAttention(config, 1, AttnMaskType.causal, "self", k_channels=8, v_channels=4, padded_base_length=0)
    attention = MLAFlashAttention(config, 1, AttnMaskType.causal, "self", k_channels=8, v_channels=4)
    q = torch.zeros(3, 1, 2, 8)
    with pytest.raises(ValueError, match="head dims"):
        attention(q, q, torch.zeros(3, 1, 2, 6), None)


def test_disable_mocked_te_is_idempotent():
    from megatron.core.transformer import multi_latent_attention as m

    disable_mocked_te()
    first = m.HAVE_TE
    disable_mocked_te()
    assert m.HAVE_TE == first
    assert not (m.HAVE_TE and not isinstance(m.TELinear, type))


# --- config mapping -------------------------------------------------------------------------------

BASE = {"q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "rope_theta": 10000, "max_position_embeddings": 163840}  # fmt: skip
V3_YARN = {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
           "original_max_position_embeddings": 4096}  # fmt: skip


def test_config_fields_deepseek_v3():
    fields = mla_config_fields({**BASE, "rope_scaling": V3_YARN})
    assert fields == {
        "multi_latent_attention": True, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_head_dim": 128,
        "qk_pos_emb_head_dim": 64, "v_head_dim": 128, "rotary_percent": 1.0, "rotary_base": 10000.0,
        "rope_type": "yarn", "rotary_scaling_factor": 40.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
    }  # fmt: skip
    MLATransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                         cuda_graph_scope=[], **fields)  # fmt: skip


def test_config_fields_plain_rope_and_no_q_lora():
    fields = mla_config_fields({**BASE, "q_lora_rank": None, "rope_scaling": None})
    assert fields["q_lora_rank"] is None
    assert (fields["rope_type"], fields["rotary_scaling_factor"], fields["mscale_all_dim"]) == ("rope", 1.0, 0.0)
    # transformers 5 style: theta inside rope_parameters
    fields = mla_config_fields({k: v for k, v in BASE.items() if k != "rope_theta"} | {"rope_parameters": {
        "rope_type": "default", "rope_theta": 5e5}})  # fmt: skip
    assert fields["rotary_base"] == 5e5


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"kv_lora_rank": 0}, "kv_lora_rank"),
        ({"q_lora_rank": "x"}, "q_lora_rank"),
        ({"v_head_dim": None}, "v_head_dim"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "linear"),
        ({"rope_scaling": {"type": "yarn", "factor": 4}}, "original_max_position_embeddings"),
        ({"rope_scaling": {**V3_YARN, "factor": 0.5}}, "factor"),
        ({"rope_scaling": {**V3_YARN, "mscale": "big"}}, "mscale"),
        ({"rope_interleave": False}, "rope_interleave"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_theta": -1}, "rope_theta"),
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
    ],
)
def test_config_fields_reject(change, match):
    with pytest.raises(ValueError, match=match) as info:
        mla_config_fields({**BASE, **change})
    assert "\n" not in str(info.value)


def test_config_fields_type_error():
    with pytest.raises(TypeError, match="hf_config"):
        mla_config_fields([("q_lora_rank", 1)])


@pytest.mark.parametrize("options", [dict(), dict(mla_fa_without_pad=True), dict(padded_base_length=1)])
def test_core_attention_packed_sequences_match_naive_formula(options):
    """THD input (two packed sequences, q/k dim 24, v dim 12) against per-sequence causal softmax."""
    from megatron.core.packed_seq_params import PackedSeqParams

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=True,
                               attention_dropout=0.0, cuda_graph_scope=[])  # fmt: skip
    attention = MLAFlashAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=0.3, k_channels=24, v_channels=12,
                                  **options)  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(7, 2, d, generator=gen) for d in (24, 24, 12))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=4, max_seqlen_kv=4)
    got = attention(q, k, v, None, packed_seq_params=packed)
    expected = []
    for start, end in ((0, 3), (3, 7)):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        scores = (qs @ ks.transpose(-1, -2) * 0.3).masked_fill(torch.ones(end - start, end - start).triu(1).bool(), float("-inf"))
        expected.append((scores.softmax(-1) @ vs).transpose(0, 1).reshape(end - start, -1))
    assert got.shape == (7, 24)
    assert (got - torch.cat(expected)).abs().max().item() <= 1e-6


def _tp2_world(rank: int, q_lora: int | None, sequence_parallel: bool) -> None:
    """TP=2 MLA (weights sliced by megatron's partition attributes) against the full HF layer:
    output, input gradient and every parameter gradient."""
    from megatron.core import parallel_state

    from mindspeed_models.adaptor import install

    install()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    torch.manual_seed(0)
    hf_cfg = hf_config(q_lora, YARN)
    hf_attn = hf_ds.DeepseekV3Attention(hf_cfg, layer_idx=0).eval()
    config = dataclasses.replace(megatron_config(hf_cfg), tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
    mc_attn = build_module(mla_self_attention_spec(), config=config, layer_number=1).eval()
    full = {f"{HF_TO_MC[n.rsplit('.', 1)[0]]}.{n.rsplit('.', 1)[1]}": p for n, p in hf_attn.named_parameters()}

    def shard(param, tensor):
        return tensor.chunk(2, dim=param.partition_dim)[rank] if getattr(param, "tensor_model_parallel", False) else tensor

    with torch.no_grad():
        for name, param in mc_attn.named_parameters():
            param.copy_(shard(param, full[name].detach()))
    x = inputs(seq=12)
    x_hf = x.clone().requires_grad_()
    grad = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
    expected = hf_forward(hf_attn, hf_cfg, x_hf)
    expected.backward(grad)
    rows = slice(6 * rank, 6 * rank + 6) if sequence_parallel else slice(None)  # this rank's tokens under SP
    x_mc = x[:, rows].clone().requires_grad_()
    got = mc_forward(mc_attn, x_mc)
    assert (got - expected[:, rows].detach()).abs().max().item() <= 1e-5
    got.backward(grad[:, rows])
    assert (x_mc.grad - x_hf.grad[:, rows]).abs().max().item() <= 1e-5
    for name, param in mc_attn.named_parameters():
        if getattr(param, "sequence_parallel", False):  # replicated norms see only this rank's tokens
            torch.distributed.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())
        assert (param.grad - shard(param, full[name].grad)).abs().max().item() <= 1e-5, name


@pytest.mark.slow
@pytest.mark.xdist_group("gloo")
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("q_lora", "sequence_parallel"), [(24, False), (None, False), (24, True)])
def test_tensor_parallel_2_matches_hf(q_lora, sequence_parallel):
    """Also the regression test for megatron's rope-key gradient at TP > 1 (see LatentKVDownProjection)."""
    from mindspeed_kernels.testing import run_world

    run_world(_tp2_world, 2, q_lora, sequence_parallel, timeout_s=120)


def test_mla_rope_goes_through_the_kernels_and_equals_megatron(monkeypatch):
    """mla_rope.apply_mla_rope = megatron's apply_rotary_pos_emb for MLA (values and gradients, with YaRN's
    mscale and pass-through channels), and building an MLA spec routes megatron's MLA to it."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import multi_latent_attention

    from mindspeed_models import mla_rope

    mla_rope.install()
    assert multi_latent_attention.apply_rotary_pos_emb is mla_rope.apply_mla_rope
    calls = []
    real = mla_rope.ops.rotary_pos_emb
    monkeypatch.setattr(mla_rope.ops, "rotary_pos_emb", lambda x, c, s: calls.append(x.shape) or real(x, c, s))
    config = MLATransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, multi_latent_attention=True,
                                  kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    freqs = torch.randn(6, 1, 1, 8, generator=gen)
    for width in (8, 12):  # rope slice alone, and with 4 channels passed through
        t = torch.randn(6, 2, 4, width, generator=gen, dtype=torch.float64)
        outs = []
        for fn in (mla_rope.apply_mla_rope, rope_utils.apply_rotary_pos_emb):
            x = t.clone().requires_grad_()
            y = fn(x, freqs, config, mscale=1.3)
            (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
            outs.append((y.detach(), x.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0])
        torch.testing.assert_close(outs[0][1], outs[1][1])
    assert len(calls) == 2
