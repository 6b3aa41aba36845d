"""The explicit registry of Hugging Face architectures: which ``config.json`` keys each one reads.

Pure data (no torch, no megatron import), so documentation can be generated from it. Each
:class:`Architecture` lists every key that changes the model, with the value ``transformers``
assumes when the key is absent, where the value goes (a megatron ``TransformerConfig`` field,
a :class:`~mindspeed_models.config.ModelSpec` field, or the RoPE tables) and, for keys
implemented only partly, the values that are supported: any other value is an error, never
ignored. :mod:`mindspeed_models.config` reads keys only through these tables.

Adding an architecture: add its keys here and an entry to
:data:`ARCHITECTURES`; ``layer_kind`` names the spec builder in :mod:`mindspeed_models.spec`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "GENERIC_IGNORED_KEYS",
    "HFKey",
    "get_architecture",
    "key_table",
]


@dataclass(frozen=True)
class HFKey:
    """One ``config.json`` key of an architecture.

    ``default`` is what ``transformers`` assumes when the key is absent (``None`` with ``derived``
    set: computed from other keys, as ``derived`` says). ``target`` names where the value goes
    ("TransformerConfig.<field>", "ModelSpec.<field>", "rope", or "-" for keys that are only
    checked). ``supported``, when not None, is the tuple of values implemented: any other value
    raises. ``note`` says how the value is mapped.
    """

    name: str
    default: object
    target: str
    note: str = ""
    supported: tuple | None = None
    derived: str = ""


@dataclass(frozen=True)
class Architecture:
    """A Hugging Face ``model_type`` and how its config maps onto megatron-core.

    ``qkv_bias``/``qk_norm`` are fixed properties of the architecture (Qwen2 always has q/k/v
    biases; Qwen3 always normalises q and k per head). ``layer_kind`` selects the layer spec
    builder ("dense", or "moe": router + SequentialMLP experts per
    layer, dense where ``TransformerConfig.moe_layer_freq`` says 0, or "mla_moe": the same with
    multi-latent attention, shared experts and DeepSeek-V3's sigmoid router).
    """

    model_type: str
    hf_class: str
    layer_kind: str
    qkv_bias: bool
    qk_norm: bool
    keys: tuple[HFKey, ...]

    def key(self, name: str) -> HFKey:
        """The rule for ``name``; KeyError if this architecture does not read it."""
        for k in self.keys:
            if k.name == name:
                return k
        raise KeyError(name)


def _sizes(vocab: int, hidden: int, ffn: int, heads: int, kv_heads: int | None, max_pos: int) -> tuple[HFKey, ...]:
    kv_derived = "num_attention_heads" if kv_heads is None else ""
    return (
        HFKey("vocab_size", vocab, "ModelSpec.vocab_size", "padded to make_vocab_size_divisible_by x TP when asked"),
        HFKey("hidden_size", hidden, "TransformerConfig.hidden_size"),
        HFKey("intermediate_size", ffn, "TransformerConfig.ffn_hidden_size"),
        HFKey("num_hidden_layers", 32, "TransformerConfig.num_layers"),
        HFKey("num_attention_heads", heads, "TransformerConfig.num_attention_heads"),
        HFKey(
            "num_key_value_heads",
            kv_heads,
            "TransformerConfig.num_query_groups",
            "GQA: K/V heads, never repeated",
            derived=kv_derived,
        ),
        HFKey(
            "max_position_embeddings",
            max_pos,
            "ModelSpec.max_position_embeddings",
            "GPTModel max_sequence_length; default original context of llama3/yarn RoPE",
        ),
    )


def _common() -> tuple[HFKey, ...]:
    return (
        HFKey("rms_norm_eps", 1e-6, "TransformerConfig.layernorm_epsilon", "RMSNorm through mindspeed_kernels"),
        HFKey(
            "hidden_act",
            "silu",
            "TransformerConfig.gated_linear_unit",
            "silu -> SwiGLU, fc1 = [gate | up]",
            supported=("silu",),
        ),
        HFKey(
            "tie_word_embeddings",
            False,
            "ModelSpec.tie_word_embeddings",
            "share_embeddings_and_output_weights (no output_layer.weight)",
        ),
        HFKey("initializer_range", 0.02, "TransformerConfig.init_method_std"),
        HFKey("attention_dropout", 0.0, "TransformerConfig.attention_dropout", "hidden_dropout is 0 (HF has none)"),
        HFKey("rope_theta", 10000.0, "rope", "base; legacy spelling (transformers<5), else rope_parameters.rope_theta"),
        HFKey(
            "rope_scaling",
            None,
            "rope",
            "legacy spelling of rope_parameters; wins over it when set, as in transformers",
        ),
        HFKey(
            "rope_parameters",
            None,
            "rope",
            "rope_type default | llama3 | yarn (mindspeed_kernels.rope); yarn's attention factor m is folded "
            "into TransformerConfig.softmax_scale as m**2",
        ),
        HFKey("partial_rotary_factor", 1.0, "rope", "partial RoPE is not implemented", supported=(1.0, 1)),
    )


def _sliding(default_window: int) -> tuple[HFKey, ...]:
    return (
        HFKey("use_sliding_window", False, "TransformerConfig.window_size", "true: window on the layers below"),
        HFKey(
            "sliding_window",
            default_window,
            "TransformerConfig.window_size",
            "W keys incl. the query's own -> window_size (W - 1, 0), band mode of flash_attention",
        ),
        HFKey(
            "max_window_layers",
            28,
            "TransformerConfig.window_attn_skip_freq",
            "layers with index >= this use the window (when layer_types is absent)",
        ),
        HFKey(
            "layer_types",
            None,
            "TransformerConfig.window_attn_skip_freq",
            "per layer: full_attention | sliding_attention",
            derived="use_sliding_window and max_window_layers",
        ),
    )


_LLAMA = Architecture(
    model_type="llama",
    hf_class="LlamaForCausalLM",
    layer_kind="dense",
    qkv_bias=False,
    qk_norm=False,
    keys=_sizes(32000, 4096, 11008, 32, None, 2048)
    + _common()
    + (
        HFKey("head_dim", None, "TransformerConfig.kv_channels", derived="hidden_size // num_attention_heads"),
        HFKey(
            "attention_bias",
            False,
            "TransformerConfig.add_bias_linear",
            "q/k/v and o_proj biases; must equal mlp_bias (megatron's add_bias_linear covers o_proj and the MLP)",
            supported=(False, True),
        ),
        HFKey("mlp_bias", False, "TransformerConfig.add_bias_linear", "gate/up/down biases", supported=(False, True)),
        HFKey("pretraining_tp", 1, "-", "HF-only slicing of the same matmuls; no effect on the result"),
    ),
)

_QWEN2 = Architecture(
    model_type="qwen2",
    hf_class="Qwen2ForCausalLM",
    layer_kind="dense",
    qkv_bias=True,
    qk_norm=False,
    keys=_sizes(151936, 4096, 22016, 32, 32, 32768)
    + _common()
    + (HFKey("head_dim", None, "TransformerConfig.kv_channels", derived="hidden_size // num_attention_heads"),)
    + _sliding(4096),
)

_QWEN3 = Architecture(
    model_type="qwen3",
    hf_class="Qwen3ForCausalLM",
    layer_kind="dense",
    qkv_bias=False,
    qk_norm=True,
    keys=_sizes(151936, 4096, 22016, 32, 32, 32768)
    + _common()
    + (
        HFKey("head_dim", 128, "TransformerConfig.kv_channels", "independent of hidden_size / heads"),
        HFKey(
            "attention_bias",
            False,
            "TransformerConfig.add_qkv_bias",
            "true also adds an o_proj bias, which the dense spec does not build",
            supported=(False,),
        ),
    )
    + _sliding(4096),
)


def _with_defaults(keys: tuple[HFKey, ...], **defaults) -> tuple[HFKey, ...]:
    """``keys`` with the transformers defaults of some of them changed (per-architecture defaults)."""
    return tuple(replace(k, default=defaults[k.name]) if k.name in defaults else k for k in keys)


def _moe(experts: str, alias: str, experts_default: int, topk_default: int) -> tuple[HFKey, ...]:
    """Router keys shared by the MoE architectures; ``experts`` is the canonical spelling, ``alias`` the other."""
    return (
        HFKey(experts, experts_default, "TransformerConfig.num_moe_experts", f"{alias} is the same key; both must agree"),
        HFKey(alias, None, "TransformerConfig.num_moe_experts", f"transformers 5 spelling of {experts}", derived=experts),
        HFKey("num_experts_per_tok", topk_default, "TransformerConfig.moe_router_topk"),
        HFKey(
            "router_aux_loss_coef",
            0.001,
            "TransformerConfig.moe_aux_loss_coeff",
            "load-balancing loss in training only (megatron's per-layer aux_loss; HF adds it only with "
            "output_router_logits); no effect on logits",
        ),
        HFKey("output_router_logits", False, "-", "HF forward output switch; ignored (megatron tracks its own aux loss)"),
    )


_QWEN3_MOE = Architecture(
    model_type="qwen3_moe",
    hf_class="Qwen3MoeForCausalLM",
    layer_kind="moe",
    qkv_bias=False,
    qk_norm=True,
    keys=_with_defaults(_sizes(151936, 2048, 6144, 32, 4, 32768), num_hidden_layers=24)
    + _common()
    + _moe("num_experts", "num_local_experts", 128, 8)
    + (
        HFKey("head_dim", None, "TransformerConfig.kv_channels", derived="hidden_size // num_attention_heads"),
        HFKey(
            "attention_bias",
            False,
            "TransformerConfig.add_qkv_bias",
            "true also adds an o_proj bias, which the layer spec does not build",
            supported=(False,),
        ),
        HFKey(
            "moe_intermediate_size",
            768,
            "TransformerConfig.moe_ffn_hidden_size",
            "per expert; intermediate_size is the dense layers'",
        ),
        HFKey(
            "norm_topk_prob",
            False,
            "TransformerConfig.moe_router_pre_softmax",
            "softmax over all experts then top-k; true renormalises the k (= megatron pre_softmax=False), "
            "false keeps them (pre_softmax=True)",
            supported=(False, True),
        ),
        HFKey("decoder_sparse_step", 1, "TransformerConfig.moe_layer_freq", "layer i is MoE when (i + 1) % step == 0"),
        HFKey("mlp_only_layers", [], "TransformerConfig.moe_layer_freq", "indices of dense (intermediate_size) layers"),
        HFKey(
            "shared_expert_intermediate_size",
            None,
            "-",
            "qwen3_moe has no shared expert (qwen2_moe's key); any size is an error",
            supported=(None, 0),
            derived="no value: transformers' Qwen3MoeConfig has no such key",
        ),
        HFKey("use_sliding_window", False, "-", "sliding windows are not implemented for MoE models", supported=(False,)),
        HFKey("sliding_window", 4096, "-", "read only when use_sliding_window is true (transformers sets it to None)"),
    ),
)

_QWEN2_MOE = Architecture(
    model_type="qwen2_moe",
    hf_class="Qwen2MoeForCausalLM",
    layer_kind="moe",
    qkv_bias=True,
    qk_norm=False,
    keys=_with_defaults(_sizes(151936, 2048, 5632, 16, 16, 32768), num_hidden_layers=24)
    + _common()
    + _moe("num_experts", "num_local_experts", 60, 4)
    + (
        HFKey("head_dim", None, "TransformerConfig.kv_channels", derived="hidden_size // num_attention_heads"),
        HFKey("qkv_bias", True, "TransformerConfig.add_qkv_bias", "q/k/v biases (no o_proj bias)", supported=(True,)),
        HFKey(
            "moe_intermediate_size",
            1408,
            "TransformerConfig.moe_ffn_hidden_size",
            "per expert; intermediate_size is the dense layers'",
        ),
        HFKey(
            "shared_expert_intermediate_size",
            5632,
            "TransformerConfig.moe_shared_expert_intermediate_size",
            "one shared SwiGLU expert scaled by sigmoid(shared_expert_gate(x)) (moe_shared_expert_gate=True)",
        ),
        HFKey(
            "norm_topk_prob",
            False,
            "TransformerConfig.moe_router_pre_softmax",
            "as qwen3_moe: false keeps the softmax-over-all values of the top-k, true renormalises them",
            supported=(False, True),
        ),
        HFKey("decoder_sparse_step", 1, "TransformerConfig.moe_layer_freq", "layer i is MoE when (i + 1) % step == 0"),
        HFKey("mlp_only_layers", [], "TransformerConfig.moe_layer_freq", "indices of dense (intermediate_size) layers"),
        HFKey("use_sliding_window", False, "-", "sliding windows are not implemented for MoE models", supported=(False,)),
        HFKey("sliding_window", 4096, "-", "read only when use_sliding_window is true"),
        HFKey("max_window_layers", 28, "-", "read only when use_sliding_window is true"),
        HFKey(
            "layer_types",
            None,
            "-",
            "written by transformers; every entry must be full_attention",
            derived="use_sliding_window and max_window_layers",
        ),
    ),
)

_MIXTRAL = Architecture(
    model_type="mixtral",
    hf_class="MixtralForCausalLM",
    layer_kind="moe",
    qkv_bias=False,
    qk_norm=False,
    # intermediate_size is each expert's size (moe_ffn_hidden_size = ffn_hidden_size).
    keys=_sizes(32000, 4096, 14336, 32, 8, 131072)
    + _with_defaults(_common(), rms_norm_eps=1e-5, rope_theta=1e6)
    + _moe("num_local_experts", "num_experts", 8, 2)
    + (
        HFKey("head_dim", None, "TransformerConfig.kv_channels", derived="hidden_size // num_attention_heads"),
        HFKey(
            "router_jitter_noise",
            0.0,
            "-",
            "training-time multiplicative input noise of the router, not implemented",
            supported=(0.0, 0),
        ),
        HFKey("sliding_window", None, "-", "sliding windows are not implemented for MoE models", supported=(None,)),
    ),
)


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


def _deepseek_moe() -> tuple[HFKey, ...]:
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


def _deepseek_v2_moe() -> tuple[HFKey, ...]:
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


_DEEPSEEK_V2 = Architecture(
    model_type="deepseek_v2",
    hf_class="DeepseekV2ForCausalLM",
    layer_kind="mla_moe",
    qkv_bias=False,
    qk_norm=False,
    keys=_with_defaults(_sizes(102400, 4096, 11008, 32, 32, 2048), num_hidden_layers=32)
    + tuple(k for k in _common() if k.name != "partial_rotary_factor")
    + tuple(k for k in _mla() if k.name != "rope_interleave")
    + _deepseek_v2_moe(),
)


_DEEPSEEK_V3 = Architecture(
    model_type="deepseek_v3",
    hf_class="DeepseekV3ForCausalLM",
    layer_kind="mla_moe",
    qkv_bias=False,
    qk_norm=False,
    keys=_with_defaults(_sizes(129280, 7168, 18432, 128, 128, 4096), num_hidden_layers=61)
    + tuple(k for k in _common() if k.name != "partial_rotary_factor")
    + _mla()
    + _deepseek_moe(),
)

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a for a in (_LLAMA, _QWEN2, _QWEN3, _QWEN2_MOE, _QWEN3_MOE, _MIXTRAL, _DEEPSEEK_V2, _DEEPSEEK_V3)
}
"""Every supported ``model_type``; the only place an architecture is registered."""

GENERIC_IGNORED_KEYS: frozenset[str] = frozenset(
    {
        "_name_or_path",
        "add_cross_attention",
        "architectures",
        "auto_map",
        "bad_words_ids",
        "begin_suppress_tokens",
        "bos_token_id",
        "chunk_size_feed_forward",
        "cross_attention_hidden_size",
        "decoder_start_token_id",
        "diversity_penalty",
        "do_sample",
        "dtype",
        "early_stopping",
        "encoder_no_repeat_ngram_size",
        "eos_token_id",
        "exponential_decay_length_penalty",
        "finetuning_task",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "id2label",
        "is_decoder",
        "is_encoder_decoder",
        "label2id",
        "length_penalty",
        "max_length",
        "min_length",
        "model_type",
        "no_repeat_ngram_size",
        "num_beam_groups",
        "num_beams",
        "num_return_sequences",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "pad_token_id",
        "prefix",
        "problem_type",
        "pruned_heads",
        "remove_invalid_values",
        "repetition_penalty",
        "return_dict",
        "return_dict_in_generate",
        "sep_token_id",
        "suppress_tokens",
        "task_specific_params",
        "temperature",
        "tf_legacy_loss",
        "tie_encoder_decoder",
        "tokenizer_class",
        "top_k",
        "top_p",
        "torch_dtype",
        "torchscript",
        "transformers_version",
        "typical_p",
        "use_bfloat16",
        "use_cache",
    }
)
"""Keys of every HF config that do not change the network (token ids, generation and export
settings; ``torch_dtype``/``dtype``: the parameter dtype is chosen by the caller)."""

REJECTED_KEYS: dict[str, str] = {
    "quantization_config": "quantized checkpoints are not supported; load an unquantized (bf16/fp16/fp32) model",
}
"""Keys whose mere presence is an error, with the reason."""


def get_architecture(model_type: object) -> Architecture:
    """The registered :class:`Architecture` for ``model_type``; ValueError naming the registered ones."""
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"config.json: model_type={model_type!r} is not supported; registered architectures: {known}")
    return ARCHITECTURES[model_type]


def key_table() -> list[dict[str, str]]:
    """One row per (architecture, key), as strings, for generated documentation (docs/models.md)."""
    rows = []
    for arch in ARCHITECTURES.values():
        for k in arch.keys:
            default = f"= {k.derived}" if k.derived else repr(k.default)
            supported = "any" if k.supported is None else " | ".join(map(repr, k.supported))
            rows.append(
                {
                    "model_type": arch.model_type,
                    "key": k.name,
                    "default": default,
                    "target": k.target,
                    "supported": supported,
                    "note": k.note,
                }
            )
    return rows
