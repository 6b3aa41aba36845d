"""The megatron side of the maps against megatron-core itself: tiny GPTModels built from
megatron's local (non-TE) layer specs must have exactly the names and shapes hf_to_mcore
produces, load them, and compute with them what the HF formulas say."""

import pytest
import torch
import torch.nn.functional as F
from ckpt_tiny_configs import CONFIGS, SYNTHETIC_ONLY, random_hf_tensors

from mindspeed_ckpt.maps import hf_to_mcore, mcore_to_hf

pytest.importorskip("megatron.core")

PADDED = 128


@pytest.fixture(scope="module")
def mcore_world():
    """World size 1 on gloo, megatron's TP=PP=1 groups, and the two CPU seams model
    construction needs (CUDA device queries; TE-mock isinstance checks in MLA)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer import multi_latent_attention

    patch = pytest.MonkeyPatch()
    patch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
    patch.setattr(multi_latent_attention, "HAVE_TE", False)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        pytest.skip("a multi-process group is already initialised in this process")
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()
    patch.undo()


class _NoCoreAttention(torch.nn.Module):
    """Stands in for core attention (no parameters): megatron's DotProductAttention cannot
    take MLA's k/v head sizes, and only parameter names matter here."""

    def __init__(self, *args, **kwargs):
        super().__init__()


def _moe_layers(c):
    n = c["num_hidden_layers"]
    if c["model_type"] == "mixtral":
        return list(range(n))
    if c["model_type"] in ("qwen2_moe", "qwen3_moe"):
        return [i for i in range(n) if i not in c["mlp_only_layers"] and (i + 1) % c["decoder_sparse_step"] == 0]
    return list(range(c["first_k_dense_replace"], n))


def _transformer_config(c, **parallel):
    """megatron TransformerConfig for an HF config, written from the HF modelling code;
    ``parallel``: extra TransformerConfig fields (parallel sizes, pipeline split)."""
    from megatron.core.transformer import MLATransformerConfig, TransformerConfig

    mla = c["model_type"].startswith("deepseek")
    kw = dict(
        num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"], num_attention_heads=c["num_attention_heads"],
        num_query_groups=c["num_key_value_heads"], ffn_hidden_size=c["intermediate_size"],
        kv_channels=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        normalization="RMSNorm", layernorm_epsilon=c["rms_norm_eps"], gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=bool(c.get("attention_bias")), add_qkv_bias=c["model_type"] in ("qwen2", "qwen2_moe"),
        qk_layernorm=mla or c["model_type"] in ("qwen3", "qwen3_moe"), use_cpu_initialization=True, **parallel,
    )
    experts = c.get("num_local_experts") or c.get("num_experts") or c.get("n_routed_experts")
    if experts:
        moe = set(_moe_layers(c))
        kw.update(num_moe_experts=experts, moe_router_topk=c["num_experts_per_tok"],
                  moe_ffn_hidden_size=c.get("moe_intermediate_size") or c["intermediate_size"],
                  moe_layer_freq=[int(i in moe) for i in range(c["num_hidden_layers"])])
    if c.get("shared_expert_intermediate_size"):
        kw.update(moe_shared_expert_intermediate_size=c["shared_expert_intermediate_size"], moe_shared_expert_gate=True)
    if c.get("n_shared_experts"):
        kw.update(moe_shared_expert_intermediate_size=c["n_shared_experts"] * c["moe_intermediate_size"])
    if c["model_type"] == "deepseek_v3":
        kw.update(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid",
                  mtp_num_layers=c["num_nextn_predict_layers"] or None)
    if not mla:
        return TransformerConfig(**kw)
    return MLATransformerConfig(**kw, q_lora_rank=c["q_lora_rank"], kv_lora_rank=c["kv_lora_rank"],
                                qk_head_dim=c["qk_nope_head_dim"], qk_pos_emb_head_dim=c["qk_rope_head_dim"],
                                v_head_dim=c["v_head_dim"], rope_type="rope")


def _build(c):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec

    config = _transformer_config(c)
    # the block spec composes get_gpt_layer_local_spec(num_experts=..., moe_grouped_gemm=False,
    # qk_layernorm=..., multi_latent_attention=...) per layer, dense or MoE by moe_layer_freq
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    if config.multi_latent_attention:
        for layer in spec.layer_specs:
            layer.submodules.self_attention.submodules.core_attention = _NoCoreAttention
    mtp = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False) if config.mtp_num_layers else None
    return GPTModel(config, spec, vocab_size=PADDED, max_sequence_length=64, position_embedding_type="rope",
                    share_embeddings_and_output_weights=bool(c["tie_word_embeddings"]), mtp_block_spec=mtp)


def _weights(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}


@pytest.mark.parametrize("key", sorted(CONFIGS) + sorted(SYNTHETIC_ONLY))
def test_names_and_shapes_match_megatron(key, mcore_world):
    c = {**CONFIGS, **SYNTHETIC_ONLY}[key]
    model = _build(c)
    mc = hf_to_mcore(c, random_hf_tensors(c), padded_vocab_size=PADDED)
    expected = _weights(model)
    assert sorted(mc) == sorted(expected)
    for k, v in expected.items():
        assert mc[k].shape == v.shape, k
    missing, unexpected = model.load_state_dict(mc, strict=False)
    assert not unexpected and all(k.endswith("._extra_state") for k in missing)
    # what megatron holds now converts back to the same HF tensors
    back = mcore_to_hf(c, _weights(model))
    hf = random_hf_tensors(c)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)


@pytest.mark.parametrize("key", ["llama_bias", "qwen2", "qwen3"])
def test_megatron_computes_the_hf_projections(key, mcore_world):
    """megatron's own q/k/v split of linear_qkv and its SwiGLU on linear_fc1 give what HF's
    separate projections give: the qkv interleave and gate|up order are what megatron reads."""
    c = CONFIGS[key]
    model = _build(c)
    hf = random_hf_tensors(c)
    model.load_state_dict(hf_to_mcore(c, hf, padded_vocab_size=PADDED), strict=False)
    layer = model.decoder.layers[1]
    x = torch.randn(5, 2, c["hidden_size"], generator=torch.Generator().manual_seed(3))
    heads, groups = c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or c["hidden_size"] // heads
    p = "model.layers.1."

    def proj(name, n):
        y = F.linear(x, hf[p + f"self_attn.{name}_proj.weight"], hf.get(p + f"self_attn.{name}_proj.bias"))
        y = y.reshape(5, 2, n, d)
        if c["model_type"] == "qwen3":  # HF Qwen3: RMSNorm over each head, before RoPE
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]) * hf[p + f"self_attn.{name}_norm.weight"]
        return y

    def mlp(name, inp):
        return F.linear(inp, hf[p + f"mlp.{name}_proj.weight"], hf.get(p + f"mlp.{name}_proj.bias"))

    with torch.no_grad():
        q, k, v = layer.self_attention.get_query_key_value_tensors(x, None)[:3]
        torch.testing.assert_close(q, proj("q", heads), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, proj("k", groups), rtol=1e-5, atol=1e-5)
        v_hf = F.linear(x, hf[p + "self_attn.v_proj.weight"], hf.get(p + "self_attn.v_proj.bias")).reshape(5, 2, groups, d)
        torch.testing.assert_close(v, v_hf, rtol=1e-5, atol=1e-5)
        out, bias = layer.mlp(x)
        out = out if bias is None else out + bias
        torch.testing.assert_close(out, mlp("down", F.silu(mlp("gate", x)) * mlp("up", x)), rtol=1e-5, atol=1e-5)
