"""Seed-000 (MindSpeed-LLM guide) and megatron-core flags that change the model, and how mindspeed-models covers them.

Data for tools/gen_models_docs.py. A row with ``hf_keys`` is implemented exactly when some
registered architecture in ``mindspeed_models.architectures`` maps one of those ``config.json``
keys onto the model (target other than "-"), a row with ``arch_attr`` when some architecture
sets that flag: the page follows the registry as MoE / MLA / MTP land. Other rows carry a
fixed ``status``. Performance-only flags (recompute, overlap, memory swaps) are left out:
they do not change what the model computes.
"""

from __future__ import annotations

from dataclasses import dataclass

IMPLEMENTED, NOT_YET, NA = "implemented", "not yet (issue #4)", "n/a"


@dataclass(frozen=True)
class SeedParam:
    """One flag (CLI spelling), its source section, and how mindspeed-models provides it.

    ``source``: "seed-000 §N" (MindSpeed-LLM guide section) or "megatron-core". ``hf_keys``: the
    HF config keys that carry the same setting. ``arch_attr``: a boolean ``Architecture`` field
    that provides the flag instead. With either, the status is derived from the registry;
    ``status`` is the fixed status otherwise. ``how``: what our code does instead of the flag.
    """

    flag: str
    source: str
    how: str
    hf_keys: tuple[str, ...] = ()
    status: str = ""
    arch_attr: str = ""


def _p(flag: str, source: str, how: str, hf_keys=(), status: str = "", arch_attr: str = "") -> SeedParam:
    return SeedParam(flag, source, how, tuple(hf_keys), status, arch_attr)


_S = "seed-000 §"
_MC = "megatron-core"

# fmt: off
SEED_PARAMS: tuple[SeedParam, ...] = (
    # Attention layout.
    _p("group-query-attention", _MC, "GQA from the HF key; K/V heads are never repeated", ["num_key_value_heads"]),
    _p("num-query-groups", _MC, "TransformerConfig.num_query_groups", ["num_key_value_heads"]),
    _p("kv-channels", _MC, "TransformerConfig.kv_channels (derived or explicit head_dim)", ["head_dim"]),
    _p("qk-layernorm", _MC, "fixed per architecture (Architecture.qk_norm); per-head RMSNorm", arch_attr="qk_norm"),
    _p("add-qkv-bias", _S + "4", "fixed per architecture (Architecture.qkv_bias); attention_bias=true is rejected",
       arch_attr="qkv_bias"),
    _p("add-dense-bias", _S + "4", "llama attention_bias = mlp_bias = true -> add_bias_linear (o_proj and MLP biases)",
       ["mlp_bias"]),
    _p("add-output-layer-bias", _S + "4", "no registered architecture has an output-layer bias", status=NA),
    _p("sliding-window", _S + "11", "TransformerConfig.window_size (+ window_attn_skip_freq per layer)", ["sliding_window"]),
    _p("interleave-sliding-window", _S + "4", "Gemma-2 style alternation; layer_types covers Qwen's per-layer windows",
       status=NA),
    _p("use-flash-attn", _MC, "always: core attention is mindspeed_kernels.ops.flash_attention (backend per device)",
       status=IMPLEMENTED),
    _p("position-embedding-type", _S + "16", "rope only (GPTModel position_embedding_type='rope'); alibi is not built",
       status=IMPLEMENTED),
    _p("attn-logit-softcapping", _S + "4", "Gemma-2 only; no registered architecture", status=NA),
    _p("query-pre-attn-scalar", _S + "4", "Gemma-2 only; yarn's attention factor goes to softmax_scale", status=NA),
    # Norms, activations, embeddings.
    _p("normalization", _MC, "RMSNorm always (mindspeed_models.layers.RMSNorm)", status=IMPLEMENTED),
    _p("norm-epsilon", _MC, "TransformerConfig.layernorm_epsilon", ["rms_norm_eps"]),
    _p("add-rmsnorm-offset", _S + "4", "override layernorm_zero_centered_gamma=True (weight stored as w - 1)",
       status=IMPLEMENTED),
    _p("swiglu", _MC, "hidden_act=silu -> SwiGLU over fc1 = [gate | up]", ["hidden_act"]),
    _p("geglu", _S + "4", "hidden_act other than silu raises", status=NOT_YET),
    _p("gelu-tanh", _S + "4", "hidden_act other than silu raises", status=NOT_YET),
    _p("use-fused-rmsnorm", _S + "10", "always: mindspeed_kernels.ops.rms_norm (fused kernel where the device has one)",
       status=IMPLEMENTED),
    _p("use-fused-swiglu", _S + "10", "always: mindspeed_kernels.ops.swiglu", status=IMPLEMENTED),
    _p("use-fused-rotary-pos-emb", _S + "10", "always: q/k through mindspeed_kernels.ops.rotary_pos_emb "
       "(KernelRopeSelfAttention; MLA via mla_rope)", status=IMPLEMENTED),
    _p("use-fused-mlp", _S + "10", "MLP is megatron's (fc1, ops.swiglu, fc2)", status=NOT_YET),
    _p("untie-embeddings-and-output-weights", _MC, "ModelSpec.tie_word_embeddings", ["tie_word_embeddings"]),
    _p("padded-vocab-size", _S + "11", "from_hf_config(make_vocab_size_divisible_by=N) pads to N x TP instead",
       status=NOT_YET),
    _p("input-embeds-norm", _S + "4", "no registered architecture normalises the embeddings", status=NA),
    _p("embed-layernorm", _S + "11", "no registered architecture normalises the embeddings", status=NA),
    _p("output-logit-softcapping", _S + "4", "Gemma-2 only; no registered architecture", status=NA),
    _p("use-glm-rope", _S + "11", "GLM only; partial_rotary_factor != 1 raises", status=NA),
    # RoPE.
    _p("rotary-base", _MC, "RoPE base", ["rope_theta", "rope_parameters"]),
    _p("rope-scaling-type", _MC, "rope_type default | llama3 | yarn", ["rope_parameters", "rope_scaling"]),
    _p("rope-scaling-factor", _S + "24", "rope_parameters.factor (llama3, yarn)", ["rope_parameters", "rope_scaling"]),
    _p("rope-scaling-beta-fast", _S + "24", "rope_parameters.beta_fast (yarn)", ["rope_parameters", "rope_scaling"]),
    _p("rope-scaling-beta-slow", _S + "24", "rope_parameters.beta_slow (yarn)", ["rope_parameters", "rope_scaling"]),
    _p("rope-scaling-mscale", _S + "24", "rope_parameters.mscale (yarn attention factor -> softmax_scale)",
       ["rope_parameters", "rope_scaling"]),
    _p("rope-scaling-mscale-all-dim", _S + "24", "rope_parameters.mscale_all_dim (yarn)", ["rope_parameters", "rope_scaling"]),
    _p("rope-scaling-original-max-position-embeddings", _S + "24", "rope_parameters.original_max_position_embeddings",
       ["rope_parameters", "rope_scaling"]),
    # MLA (§21).
    _p("multi-head-latent-attention", _S + "21", "DeepSeek-V2/V3 attention", ["kv_lora_rank"]),
    _p("q-lora-rank", _S + "21", "low-rank Q (None: full q_proj)", ["q_lora_rank"]),
    _p("kv-lora-rank", _S + "21", "compressed KV rank", ["kv_lora_rank"]),
    _p("v-head-dim", _S + "21", "value head size", ["v_head_dim"]),
    _p("qk-rope-head-dim", _S + "21", "rotary part of the q/k head", ["qk_rope_head_dim"]),
    _p("qk-nope-head-dim", _S + "21", "non-rotary part of the q/k head", ["qk_nope_head_dim"]),
    _p("padded-base-length", _S + "21", "MLAFlashAttention zero-pads q/k head dims to a multiple (numerically neutral)",
       status=IMPLEMENTED),
    _p("mla-fa-without-pad", _S + "21", "MLAFlashAttention: False pads v's head dim to q/k's (numerically neutral)",
       status=IMPLEMENTED),
    _p("mla-mm-split", _S + "21", "only False is accepted (splitting the up-projection matmuls is numerically neutral)",
       status=NOT_YET),
    # MoE (§7, §22, megatron-core).
    _p("num-experts", _MC, "routed experts", ["num_experts", "num_local_experts", "n_routed_experts"]),
    _p("moe-router-topk", _MC, "experts per token", ["num_experts_per_tok"]),
    _p("moe-intermediate-size", _S + "22", "expert FFN size", ["moe_intermediate_size"]),
    _p("n-shared-experts", _S + "22", "shared experts (DeepSeek) / shared expert size (Qwen2-MoE)",
       ["n_shared_experts", "shared_expert_intermediate_size"]),
    _p("shared-expert-gate", _S + "7", "sigmoid gate on the shared expert (Qwen2-MoE)", ["shared_expert_intermediate_size"]),
    _p("first-k-dense-replace", _S + "22", "first K layers dense", ["first_k_dense_replace"]),
    _p("moe-layer-freq", _S + "22", "which layers are MoE", ["moe_layer_freq", "decoder_sparse_step", "mlp_only_layers"]),
    _p("expert-interval", _S + "7", "which layers are MoE", ["decoder_sparse_step", "mlp_only_layers"]),
    _p("moe-token-dispatcher-type", _S + "7", "override moe_token_dispatcher_type (megatron's dispatchers)",
       ["num_experts", "num_local_experts", "n_routed_experts"]),
    _p("moe-router-load-balancing-type", _MC, "override: none | aux_loss | seq_aux_loss | global_aux_loss (megatron's losses, "
       "also under DeepSeek's DeepSeekRouter)", status=IMPLEMENTED),
    _p("moe-aux-loss-coeff", _MC, "HF router_aux_loss_coef (qwen3_moe, mixtral) or override", ["router_aux_loss_coef"]),
    _p("seq-aux", _S + "22", "override moe_router_load_balancing_type='seq_aux_loss' (DeepSeek-V3 sequence-wise loss)",
       status=IMPLEMENTED),
    _p("moe-z-loss-coeff", _MC, "override moe_z_loss_coeff (megatron's router z-loss)", status=IMPLEMENTED),
    _p("moe-expert-capacity-factor", _MC, "override moe_expert_capacity_factor (+ moe_token_drop_policy, "
       "moe_pad_expert_input_to_capacity): megatron's token dropping", status=IMPLEMENTED),
    _p("moe-train-capacity-factor", _S + "7", "same as moe_expert_capacity_factor", status=IMPLEMENTED),
    _p("moe-router-bias-update-rate", _MC, "TransformerConfig.moe_router_bias_update_rate (DeepSeek expert bias, 1e-3)",
       ["topk_method"]),
    _p("moe-router-topk-scaling-factor", _MC, "HF routed_scaling_factor", ["routed_scaling_factor"]),
    _p("moe-router-num-groups", _MC, "HF n_group / topk_group (group-limited routing)", ["n_group", "topk_group"]),
    _p("use-fused-moe-token-permute-and-unpermute", _S + "7", "override moe_permute_fusion=True: token permutation "
       "through mindspeed_kernels.ops.moe_token_permute/unpermute (megatron's fused hooks)", status=IMPLEMENTED),
    _p("moe-grouped-gemm", _MC, "override moe_grouped_gemm=True: experts through mindspeed_kernels.ops.grouped_matmul",
       status=IMPLEMENTED),
    _p("noisy-gate-policy", _S + "7", "training-time router noise; HF checkpoints have none", status=NA),
    _p("input-jitter", _S + "7", "training-time router noise; HF checkpoints have none", status=NA),
    # MTP (§19).
    _p("mtp-num-layers", _S + "19", "multi-token-prediction heads (DeepSeek-V3)", ["num_nextn_predict_layers"]),
    _p("mtp-loss-scaling-factor", _S + "19", "training loss weight of the MTP heads", ["num_nextn_predict_layers"]),
)
# fmt: on
"""Every flag the page lists, in display order."""
