"""Dense decoder families: llama, qwen2 (q/k/v bias), qwen3 (per-head q/k RMSNorm)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mindspeed_ckpt.maps import common
from mindspeed_ckpt.maps.config import base_dims, count, flag
from mindspeed_ckpt.maps.spec import Architecture, Layout


def attention_bias_features(cfg: Mapping[str, Any]) -> set[str]:
    """Llama-style ``attention_bias``: bias on q, k, v and o projections alike."""
    return {"qkv_bias", "proj_bias"} if flag(cfg, "attention_bias") else set()


def _layout(dims: dict[str, int], features: set[str], cfg: Mapping[str, Any]) -> Layout:
    return Layout(dims=dims, features=frozenset(features), num_layers=count(cfg, "num_hidden_layers"))


def read_llama(cfg: Mapping[str, Any]) -> Layout:
    dims, features = base_dims(cfg)
    features |= attention_bias_features(cfg)
    if flag(cfg, "mlp_bias"):
        features.add("mlp_bias")
    return _layout(dims, features, cfg)


def read_qwen2(cfg: Mapping[str, Any]) -> Layout:
    dims, features = base_dims(cfg)
    features.add("qkv_bias")  # Qwen2 always has q/k/v biases and none elsewhere
    return _layout(dims, features, cfg)


def read_qwen3(cfg: Mapping[str, Any]) -> Layout:
    dims, features = base_dims(cfg)
    features |= attention_bias_features(cfg) | {"qk_norm"}
    return _layout(dims, features, cfg)


def dense(model_type: str, read) -> Architecture:
    return Architecture(
        model_type=model_type,
        read=read,
        embed=common.EMBED,
        attention=common.GQA_ATTENTION,
        dense_mlp=common.DENSE_MLP,
        final=common.FINAL,
    )


LLAMA = dense("llama", read_llama)
QWEN2 = dense("qwen2", read_qwen2)
QWEN3 = dense("qwen3", read_qwen3)
