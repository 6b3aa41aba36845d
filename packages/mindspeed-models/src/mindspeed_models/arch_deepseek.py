"""DeepSeek-V2 and DeepSeek-V3 entries of the architecture registry (multi-latent attention + DeepSeek MoE).

Pure data; see :mod:`mindspeed_models.architectures`.
"""

from __future__ import annotations

from mindspeed_models.arch_keys import Architecture, HFKey, common_keys, size_keys, with_defaults

__all__ = ["DEEPSEEK_V2", "DEEPSEEK_V3"]


def _mla() -> tuple[HFKey, ...]:
    """Multi-latent attention keys (mindspeed_models.mla.mla_config_fields)."""
    return (
        HFKey("q_lora_rank", 1536, "TransformerConfig.q_lora_rank", "null: no q compression (linear_q_proj)"),
        HFKey("kv_lora_rank", 512, "TransformerConfig.kv_lora_rank"),
        HFKey("qk_nope_head_dim", 128, "TransformerConfig.qk_head_dim"),
        HFKey("qk_rope_head_dim", 64, "TransformerConfig.qk_pos_emb_head_dim"),
        HFKey("v_head_dim", 128, "TransformerConfig.v_head_dim"),
        HFKey(
            "rope_interleave",
            True,
            "-",
            "megatron's MLA de-interleaves the rope channels as transformers does",
            supported=(True,),
        ),
        HFKey("attention_bias", False, "-", "MLA projections have no bias", supported=(False,)),
        HFKey(
            "head_dim",
            None,
            "-",
            "written by transformers; MLA head dims come from the keys above",
            derived="qk_rope_head_dim",
        ),
        HFKey("qk_head_dim", None, "-", "written by transformers; not read", derived="qk_nope_head_dim + qk_rope_head_dim"),
    )


_ORIGINAL_KEY = "absent from transformers' DeepseekV3Config (original DeepSeek config.json key)"
_V2_ORIGINAL_KEY = "absent from transformers' DeepseekV2Config (original DeepSeek config.json key)"


def _deepseek_experts(routed: int, topk: int | None, ffn: int, shared: int, first_dense: int, original: str) -> tuple[HFKey, ...]:
    """Expert-count and placement keys shared by DeepSeek-V2 and V3 (their transformers defaults differ)."""
    return (
        HFKey("n_routed_experts", routed, "TransformerConfig.num_moe_experts", "num_local_experts is the same key"),
        HFKey(
            "num_local_experts",
            None,
            "TransformerConfig.num_moe_experts",
            "alias of n_routed_experts",
            derived="n_routed_experts",
        ),
        HFKey("num_experts_per_tok", topk, "TransformerConfig.moe_router_topk"),
        HFKey("moe_intermediate_size", ffn, "TransformerConfig.moe_ffn_hidden_size", "per routed expert"),
        HFKey(
            "n_shared_experts",
            shared,
            "TransformerConfig.moe_shared_expert_intermediate_size",
            "= n_shared_experts x moe_intermediate_size (one ungated shared MLP); 0: none",
        ),
        HFKey(
            "first_k_dense_replace",
            first_dense,
            "TransformerConfig.moe_layer_freq",
            "the first k layers are dense (intermediate_size)",
        ),
        HFKey(
            "moe_layer_freq",
            1,
            "TransformerConfig.moe_layer_freq",
            "every layer after the dense ones",
            supported=(1,),
            derived=original,
        ),
        HFKey("aux_loss_alpha", 0.001, "-", "training-only balance loss: use the moe_aux_loss_coeff override", derived=original),
        HFKey("seq_aux", True, "-", "use moe_router_load_balancing_type='seq_aux_loss'", derived=original),
        HFKey("ep_size", 1, "-", "use the expert_model_parallel_size override", derived=original),
        HFKey("output_router_logits", False, "-", "HF forward output switch; ignored"),
        HFKey("pretraining_tp", 1, "-", "HF-only slicing of the same matmuls; no effect on the result"),
    )


def _deepseek_v3_router_keys() -> tuple[HFKey, ...]:
    """DeepSeek-V3 router/expert keys; the router is mindspeed_models.moe.DeepSeekRouter (sigmoid)."""
    return _deepseek_experts(256, 8, 2048, 1, 3, _ORIGINAL_KEY) + (
        HFKey("n_group", 8, "TransformerConfig.moe_router_num_groups", "groups ranked by the sum of their 2 best scores"),
        HFKey("topk_group", 4, "TransformerConfig.moe_router_group_topk"),
        HFKey(
            "norm_topk_prob",
            True,
            "ModelSpec.layer_specs",
            "divide the k sigmoid scores by their sum (megatron's sigmoid router always would)",
            supported=(True, False),
        ),
        HFKey("routed_scaling_factor", 2.5, "TransformerConfig.moe_router_topk_scaling_factor", "after the normalisation"),
        HFKey(
            "scoring_func",
            "sigmoid",
            "TransformerConfig.moe_router_score_function",
            "",
            supported=("sigmoid",),
            derived=_ORIGINAL_KEY,
        ),
        HFKey(
            "topk_method",
            "noaux_tc",
            "TransformerConfig.moe_router_enable_expert_bias",
            "e_score_correction_bias -> mlp.router.expert_bias, for selection only",
            supported=("noaux_tc",),
            derived=_ORIGINAL_KEY,
        ),
        HFKey(
            "num_nextn_predict_layers",
            1,
            "TransformerConfig.mtp_num_layers",
            "Multi-Token Prediction layers (checkpoint layers num_hidden_layers + k); "
            "their loss is added in training, logits without labels skip them",
        ),
    )


def _deepseek_v2_router_keys() -> tuple[HFKey, ...]:
    """DeepSeek-V2 router/expert keys: softmax scores, greedy or group-limited greedy, no expert bias, no MTP."""
    return _deepseek_experts(64, None, 1407, 2, 0, _V2_ORIGINAL_KEY) + (
        HFKey(
            "topk_method",
            "greedy",
            "TransformerConfig.moe_router_num_groups",
            "greedy: plain top-k; group_limited_greedy: the topk_group groups with the best single score",
            supported=("greedy", "group_limited_greedy"),
        ),
        HFKey("n_group", None, "TransformerConfig.moe_router_num_groups", "read with topk_method group_limited_greedy"),
        HFKey("topk_group", None, "TransformerConfig.moe_router_group_topk", "read with topk_method group_limited_greedy"),
        HFKey(
            "norm_topk_prob",
            False,
            "-",
            "transformers' DeepseekV2 never renormalises the k softmax weights; true would be ignored there",
            supported=(False,),
        ),
        HFKey("routed_scaling_factor", 1.0, "TransformerConfig.moe_router_topk_scaling_factor", "multiplies the k weights"),
        HFKey(
            "scoring_func",
            "softmax",
            "TransformerConfig.moe_router_score_function",
            "",
            supported=("softmax",),
            derived=_V2_ORIGINAL_KEY,
        ),
        HFKey("mlp_bias", False, "-", "DeepSeek MLPs have no bias", supported=(False,)),
    )


DEEPSEEK_V2 = Architecture(
    model_type="deepseek_v2",
    hf_class="DeepseekV2ForCausalLM",
    layer_kind="mla_moe",
    qkv_bias=False,
    qk_norm=False,
    keys=with_defaults(size_keys(102400, 4096, 11008, 32, 32, 2048), num_hidden_layers=32)
    + tuple(k for k in common_keys() if k.name != "partial_rotary_factor")
    + tuple(k for k in _mla() if k.name != "rope_interleave")
    + _deepseek_v2_router_keys(),
)


DEEPSEEK_V3 = Architecture(
    model_type="deepseek_v3",
    hf_class="DeepseekV3ForCausalLM",
    layer_kind="mla_moe",
    qkv_bias=False,
    qk_norm=False,
    keys=with_defaults(size_keys(129280, 7168, 18432, 128, 128, 4096), num_hidden_layers=61)
    + tuple(k for k in common_keys() if k.name != "partial_rotary_factor")
    + _mla()
    + _deepseek_v3_router_keys(),
)
