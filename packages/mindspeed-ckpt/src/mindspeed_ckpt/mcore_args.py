"""The ``args`` namespace stored in each rank file: what megatron's loader and our reader consult.

Field names are Megatron-LM's argument names (``--num-layers`` -> ``num_layers``), so a
training job started from the checkpoint can compare them with its own, and
``mcore_to_hf`` / :func:`mindspeed_ckpt.read_mcore` recover the parallel layout (PP layer
split, VPP, EP) without flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from mindspeed_ckpt import maps
from mindspeed_ckpt.maps.config import model_type
from mindspeed_ckpt.placement import Grid

ITERATION = 1


def _rope_theta(cfg: Mapping[str, Any]) -> Any:
    params = cfg.get("rope_parameters")
    return cfg.get("rope_theta") or (params.get("rope_theta") if isinstance(params, Mapping) else None)


def _pipeline(grid: Grid, first: int | None, last: int | None, layer_list: tuple[int, ...] | None) -> dict[str, Any]:
    vpp = grid.vpp if grid.vpp > 1 else None
    return dict(
        pipeline_model_parallel_size=grid.pp, virtual_pipeline_model_parallel_size=vpp,
        num_layers_per_virtual_pipeline_stage=grid.counts[0] // grid.vpp if vpp else None,
        decoder_first_pipeline_num_layers=first, decoder_last_pipeline_num_layers=last,
        # MindSpeed's --num-layer-list spelling; our reader uses it for any uneven split
        num_layer_list=",".join(map(str, layer_list)) if layer_list else None,
        noop_layers=",".join(map(str, grid.noop)) or None,
    )


def _moe_layer_freq(lay: maps.Layout, grid: Grid) -> list[int]:
    """Per megatron layer: 1 for an MoE layer (noop layers count as dense)."""
    real = dict(zip(grid.real_layers, range(lay.num_layers), strict=True))
    return [int(m in real and real[m] in lay.moe_layers) for m in range(sum(grid.counts))]


def _moe(cfg: Mapping[str, Any], lay: maps.Layout, grid: Grid) -> dict[str, Any]:
    d, f = lay.dims, lay.features
    if not grid.experts:
        return dict(num_experts=None, expert_model_parallel_size=1, expert_tensor_parallel_size=1)
    deepseek = model_type(cfg).startswith("deepseek")
    return dict(
        num_experts=grid.experts, expert_model_parallel_size=grid.ep, expert_tensor_parallel_size=1,
        moe_router_topk=cfg.get("num_experts_per_tok"), moe_ffn_hidden_size=d["moe_ffn"],
        moe_layer_freq=_moe_layer_freq(lay, grid), moe_grouped_gemm=False,
        moe_shared_expert_intermediate_size=d.get("shared_ffn"),
        moe_shared_expert_gate=model_type(cfg) == "qwen2_moe",
        moe_router_enable_expert_bias="expert_bias" in f,
        moe_router_score_function="sigmoid" if "expert_bias" in f else "softmax",
        moe_router_num_groups=cfg.get("n_group") if deepseek else None,
        moe_router_group_topk=cfg.get("topk_group") if deepseek else None,
        moe_router_topk_scaling_factor=cfg.get("routed_scaling_factor") if deepseek else None,
    )


def _mla(cfg: Mapping[str, Any]) -> dict[str, Any]:
    if not model_type(cfg).startswith("deepseek"):
        return dict(multi_latent_attention=False)
    return dict(multi_latent_attention=True, q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=cfg["kv_lora_rank"],
                qk_head_dim=cfg["qk_nope_head_dim"], qk_pos_emb_head_dim=cfg["qk_rope_head_dim"],
                v_head_dim=cfg["v_head_dim"])


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` (or the fast path's stand-in for it) -> ``'bfloat16'``."""
    return str(dtype).removeprefix("torch.")


def megatron_args(cfg: Mapping[str, Any], lay: maps.Layout, *, tp: int, grid: Grid, padded: int, dtype: Any,
                  divisible_by: int, first: int | None = None, last: int | None = None,
                  layer_list: tuple[int, ...] | None = None) -> argparse.Namespace:
    """The args of a converted checkpoint, from the HF config, its layout and the grid."""
    d, f = lay.dims, lay.features
    mla = model_type(cfg).startswith("deepseek")
    return argparse.Namespace(
        num_layers=sum(grid.counts), hidden_size=d["hidden"], ffn_hidden_size=d["ffn"], num_attention_heads=d["heads"],
        num_query_groups=d["groups"], group_query_attention=d["groups"] != d["heads"], kv_channels=d["head_dim"],
        tensor_model_parallel_size=tp, **_pipeline(grid, first, last, layer_list), **_moe(cfg, lay, grid), **_mla(cfg),
        mtp_num_layers=lay.num_mtp or None, vocab_size=d["vocab"], padded_vocab_size=padded,
        make_vocab_size_divisible_by=divisible_by, max_position_embeddings=cfg.get("max_position_embeddings"),
        untie_embeddings_and_output_weights="untied" in f, add_qkv_bias="qkv_bias" in f,
        add_bias_linear="proj_bias" in f, qk_layernorm="qk_norm" in f or mla, normalization="RMSNorm",
        norm_epsilon=cfg.get("rms_norm_eps"), swiglu=True, position_embedding_type="rope",
        add_position_embedding=False, rotary_base=_rope_theta(cfg),
        params_dtype=dtype, bf16=dtype_name(dtype) == "bfloat16", fp16=dtype_name(dtype) == "float16",
        consumed_train_samples=0, consumed_valid_samples=0, iteration=ITERATION, hf_model_type=model_type(cfg),
    )
