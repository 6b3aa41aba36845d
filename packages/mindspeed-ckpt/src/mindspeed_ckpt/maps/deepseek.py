"""DeepSeek families: multi-latent attention (MLA), MoE with shared experts and dense first
layers; deepseek_v3 adds the router's expert bias and multi-token-prediction (MTP) layers.

MLA tensors keep their layout: HF's q_b / kv_b / kv_a_with_mqa rows are already ordered
per head as megatron's linear_q_up / linear_kv_up / linear_kv_down expect ([nope, rope] for
q, [k_nope, v] for kv, [latent, rope] for the down projection). The latent norms map to
megatron's ``q_layernorm`` / ``kv_layernorm``, which the local spec only builds with
``qk_layernorm=True``.

MTP layer k is HF layer ``num_hidden_layers + k`` (DeepSeek-V3's checkpoint layer 61): its
``embed_tokens`` and ``shared_head.head`` duplicate the main embedding and output layer, which
megatron's MTP block shares, so they are alias rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mindspeed_ckpt.maps import common
from mindspeed_ckpt.maps.common import HF_LAYER, MC_LAYER
from mindspeed_ckpt.maps.config import base_dims, count, reject
from mindspeed_ckpt.maps.spec import Architecture, Layout, P

_ATTN_HF = f"{HF_LAYER}.self_attn"
_ATTN_MC = f"{MC_LAYER}.self_attention"

MLA_ATTENTION = (
    *common.NORMS_AROUND_ATTENTION,
    P(f"{_ATTN_HF}.q_proj.weight", f"{_ATTN_MC}.linear_q_proj.weight", ("q_up", "hidden"), when="no_q_lora"),
    P(f"{_ATTN_HF}.q_a_proj.weight", f"{_ATTN_MC}.linear_q_down_proj.weight", ("q_lora", "hidden"), when="q_lora"),
    P(f"{_ATTN_HF}.q_a_layernorm.weight", f"{_ATTN_MC}.q_layernorm.weight", ("q_lora",), when="q_lora"),
    P(f"{_ATTN_HF}.q_b_proj.weight", f"{_ATTN_MC}.linear_q_up_proj.weight", ("q_up", "q_lora"), when="q_lora"),
    P(f"{_ATTN_HF}.kv_a_proj_with_mqa.weight", f"{_ATTN_MC}.linear_kv_down_proj.weight", ("kv_down", "hidden")),
    P(f"{_ATTN_HF}.kv_a_layernorm.weight", f"{_ATTN_MC}.kv_layernorm.weight", ("kv_lora",)),
    P(f"{_ATTN_HF}.kv_b_proj.weight", f"{_ATTN_MC}.linear_kv_up_proj.weight", ("kv_up", "kv_lora")),
    P(f"{_ATTN_HF}.o_proj.weight", f"{_ATTN_MC}.linear_proj.weight", ("hidden", "attn_out")),
)

DEEPSEEK_MOE = (
    common.ROUTER,
    P(f"{HF_LAYER}.mlp.gate.e_score_correction_bias", f"{MC_LAYER}.mlp.router.expert_bias", ("experts",),
      when="expert_bias"),
    *common.swiglu(f"{HF_LAYER}.mlp.shared_experts", f"{MC_LAYER}.mlp.shared_experts",
                   "gate_proj", "up_proj", "down_proj", "shared_ffn", when="shared_experts"),
)

_VOCAB = {"transform": "vocab", "params": ("vocab", "padded_vocab"), "alias": True}
MTP_EXTRAS = (
    P(f"{HF_LAYER}.enorm.weight", "mtp.layers.{mtp}.enorm.weight", ("hidden",)),
    P(f"{HF_LAYER}.hnorm.weight", "mtp.layers.{mtp}.hnorm.weight", ("hidden",)),
    # input is cat(enorm(embedding), hnorm(hidden)) in both implementations
    P(f"{HF_LAYER}.eh_proj.weight", "mtp.layers.{mtp}.eh_proj.weight", ("hidden", "hidden2")),
    P(f"{HF_LAYER}.shared_head.norm.weight", "mtp.layers.{mtp}.final_layernorm.weight", ("hidden",)),
    P(f"{HF_LAYER}.embed_tokens.weight", "embedding.word_embeddings.weight", ("vocab", "hidden"), **_VOCAB),
    P(f"{HF_LAYER}.shared_head.head.weight", "output_layer.weight", ("vocab", "hidden"), when="untied", **_VOCAB),
    P(f"{HF_LAYER}.shared_head.head.weight", "embedding.word_embeddings.weight", ("vocab", "hidden"),
      when="tied", **_VOCAB),
)


def _mla_dims(cfg: Mapping[str, Any], dims: dict[str, int], features: set[str]) -> None:
    heads = dims["heads"]
    nope, rope = count(cfg, "qk_nope_head_dim"), count(cfg, "qk_rope_head_dim")
    v_dim, kv_lora = count(cfg, "v_head_dim"), count(cfg, "kv_lora_rank")
    if cfg.get("q_lora_rank") is None:
        features.add("no_q_lora")
    else:
        features.add("q_lora")
        dims["q_lora"] = count(cfg, "q_lora_rank")
    dims.update(q_up=heads * (nope + rope), kv_lora=kv_lora, kv_down=kv_lora + rope,
                kv_up=heads * (nope + v_dim), attn_out=heads * v_dim)


def _read(cfg: Mapping[str, Any], *, v3: bool) -> Layout:
    reject(cfg, "attention_bias", "mlp_bias")
    dims, features = base_dims(cfg)
    _mla_dims(cfg, dims, features)
    dims["experts"] = count(cfg, ("n_routed_experts", "num_local_experts"))
    dims["moe_ffn"] = count(cfg, "moe_intermediate_size")
    dims["hidden2"] = 2 * dims["hidden"]
    shared = count(cfg, "n_shared_experts", 0, minimum=0)
    if shared:
        features.add("shared_experts")
        dims["shared_ffn"] = shared * dims["moe_ffn"]
    if count(cfg, "moe_layer_freq", 1) != 1:
        raise ValueError("hf_config['moe_layer_freq'] != 1 is not supported (every layer from first_k_dense_replace is MoE)")
    first_moe = count(cfg, "first_k_dense_replace", 0, minimum=0)
    n = count(cfg, "num_hidden_layers")
    mtp = count(cfg, "num_nextn_predict_layers", 0, minimum=0) if v3 else 0
    if v3:
        features.add("expert_bias")  # DeepSeek-V3's noaux_tc router always stores e_score_correction_bias
    return Layout(dims=dims, features=frozenset(features), num_layers=n,
                  moe_layers=frozenset(range(first_moe, n + mtp)), num_mtp=mtp)


def read_deepseek_v2(cfg: Mapping[str, Any]) -> Layout:
    return _read(cfg, v3=False)


def read_deepseek_v3(cfg: Mapping[str, Any]) -> Layout:
    return _read(cfg, v3=True)


DEEPSEEK_V2 = Architecture(
    model_type="deepseek_v2",
    read=read_deepseek_v2,
    embed=common.EMBED,
    attention=MLA_ATTENTION,
    dense_mlp=common.DENSE_MLP,
    final=common.FINAL,
    moe=DEEPSEEK_MOE,
    expert=common.EXPERT,
)

DEEPSEEK_V3 = Architecture(
    model_type="deepseek_v3",
    read=read_deepseek_v3,
    embed=common.EMBED,
    attention=MLA_ATTENTION,
    dense_mlp=common.DENSE_MLP,
    final=common.FINAL,
    moe=DEEPSEEK_MOE,
    expert=common.EXPERT,
    mtp=MTP_EXTRAS,
)
