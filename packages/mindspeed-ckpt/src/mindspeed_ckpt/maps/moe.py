"""Mixture-of-experts families with GQA attention: mixtral, qwen2_moe, qwen3_moe."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mindspeed_ckpt.maps import common
from mindspeed_ckpt.maps.common import HF_LAYER, MC_LAYER
from mindspeed_ckpt.maps.config import base_dims, count, flag, get
from mindspeed_ckpt.maps.dense import attention_bias_features
from mindspeed_ckpt.maps.spec import Architecture, Layout, P


def qwen_moe_layers(cfg: Mapping[str, Any], num_layers: int) -> frozenset[int]:
    """Qwen's rule: layer i is MoE unless listed in mlp_only_layers, and only every
    decoder_sparse_step-th layer (1-based) is."""
    step = count(cfg, "decoder_sparse_step", 1)
    dense_only = get(cfg, "mlp_only_layers", [])
    if not isinstance(dense_only, (list, tuple)):
        raise ValueError(f"hf_config['mlp_only_layers'] must be a list of layer indices; got {dense_only!r}")
    return frozenset(i for i in range(num_layers) if i not in set(dense_only) and (i + 1) % step == 0)


def read_mixtral(cfg: Mapping[str, Any]) -> Layout:
    dims, features = base_dims(cfg)
    dims["experts"] = count(cfg, ("num_local_experts", "num_experts"))
    dims["moe_ffn"] = dims["ffn"]  # Mixtral's intermediate_size is the expert size
    n = count(cfg, "num_hidden_layers")
    return Layout(dims=dims, features=frozenset(features), num_layers=n, moe_layers=frozenset(range(n)))


def _qwen_moe(cfg: Mapping[str, Any], features: set[str], dims: dict[str, int]) -> Layout:
    # transformers >= 5 writes num_experts as num_local_experts; Hub configs say num_experts.
    dims["experts"] = count(cfg, ("num_experts", "num_local_experts"))
    dims["moe_ffn"] = count(cfg, "moe_intermediate_size")
    n = count(cfg, "num_hidden_layers")
    return Layout(dims=dims, features=frozenset(features), num_layers=n, moe_layers=qwen_moe_layers(cfg, n))


def read_qwen3_moe(cfg: Mapping[str, Any]) -> Layout:
    dims, features = base_dims(cfg)
    features |= attention_bias_features(cfg) | {"qk_norm"}
    return _qwen_moe(cfg, features, dims)


def read_qwen2_moe(cfg: Mapping[str, Any]) -> Layout:
    dims, features = base_dims(cfg)
    if flag(cfg, "qkv_bias", True):  # absent in Qwen1.5-MoE configs, whose q/k/v have biases
        features.add("qkv_bias")
    dims["shared_ffn"] = count(cfg, "shared_expert_intermediate_size")
    return _qwen_moe(cfg, features, dims)


MIXTRAL_MOE = (
    P(f"{HF_LAYER}.block_sparse_moe.gate.weight", f"{MC_LAYER}.mlp.router.weight", ("experts", "hidden")),
)
MIXTRAL_EXPERT = common.swiglu(
    f"{HF_LAYER}.block_sparse_moe.experts.{{expert}}", f"{MC_LAYER}.mlp.experts.local_experts.{{expert}}",
    "w1", "w3", "w2", "moe_ffn",
)

QWEN2_MOE_BLOCK = (
    common.ROUTER,
    *common.swiglu(f"{HF_LAYER}.mlp.shared_expert", f"{MC_LAYER}.mlp.shared_experts",
                   "gate_proj", "up_proj", "down_proj", "shared_ffn"),
    # sigmoid(x @ gate^T) scales the shared expert's output in both implementations
    P(f"{HF_LAYER}.mlp.shared_expert_gate.weight", f"{MC_LAYER}.mlp.shared_experts.gate_weight", ("one", "hidden")),
)

MIXTRAL = Architecture(
    model_type="mixtral",
    read=read_mixtral,
    embed=common.EMBED,
    attention=common.GQA_ATTENTION,
    dense_mlp=(),
    final=common.FINAL,
    moe=MIXTRAL_MOE,
    expert=MIXTRAL_EXPERT,
)

QWEN3_MOE = Architecture(
    model_type="qwen3_moe",
    read=read_qwen3_moe,
    embed=common.EMBED,
    attention=common.GQA_ATTENTION,
    dense_mlp=common.DENSE_MLP,
    final=common.FINAL,
    moe=(common.ROUTER,),
    expert=common.EXPERT,
)

QWEN2_MOE = Architecture(
    model_type="qwen2_moe",
    read=read_qwen2_moe,
    embed=common.EMBED,
    attention=common.GQA_ATTENTION,
    dense_mlp=common.DENSE_MLP,
    final=common.FINAL,
    moe=QWEN2_MOE_BLOCK,
    expert=common.EXPERT,
)
