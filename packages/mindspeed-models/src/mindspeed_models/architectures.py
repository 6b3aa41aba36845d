"""The explicit registry of Hugging Face architectures: which ``config.json`` keys each one reads.

Pure data (no torch, no megatron import), so documentation can be generated from it. Each
:class:`Architecture` lists every key that changes the model, with the value ``transformers``
assumes when the key is absent, where the value goes (a megatron ``TransformerConfig`` field,
a :class:`~mindspeed_models.config.ModelSpec` field, or the RoPE tables) and, for keys
implemented only partly, the values that are supported: any other value is an error, never
ignored. :mod:`mindspeed_models.config` reads keys only through these tables.

Adding an architecture: define it here (or in a family module such as
:mod:`mindspeed_models.arch_deepseek`, from the key groups of :mod:`mindspeed_models.arch_keys`) and
add it to :data:`ARCHITECTURES`; ``layer_kind`` names the spec builder in :mod:`mindspeed_models.spec`.
"""

from __future__ import annotations

from mindspeed_models.arch_deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from mindspeed_models.arch_keys import Architecture, HFKey, common_keys, moe_keys, size_keys, sliding_keys, with_defaults

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "GENERIC_IGNORED_KEYS",
    "HFKey",
    "get_architecture",
    "key_table",
]


_LLAMA = Architecture(
    model_type="llama",
    hf_class="LlamaForCausalLM",
    layer_kind="dense",
    qkv_bias=False,
    qk_norm=False,
    keys=size_keys(32000, 4096, 11008, 32, None, 2048)
    + common_keys()
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
    keys=size_keys(151936, 4096, 22016, 32, 32, 32768)
    + common_keys()
    + (HFKey("head_dim", None, "TransformerConfig.kv_channels", derived="hidden_size // num_attention_heads"),)
    + sliding_keys(4096),
)

_QWEN3 = Architecture(
    model_type="qwen3",
    hf_class="Qwen3ForCausalLM",
    layer_kind="dense",
    qkv_bias=False,
    qk_norm=True,
    keys=size_keys(151936, 4096, 22016, 32, 32, 32768)
    + common_keys()
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
    + sliding_keys(4096),
)

_QWEN3_MOE = Architecture(
    model_type="qwen3_moe",
    hf_class="Qwen3MoeForCausalLM",
    layer_kind="moe",
    qkv_bias=False,
    qk_norm=True,
    keys=with_defaults(size_keys(151936, 2048, 6144, 32, 4, 32768), num_hidden_layers=24)
    + common_keys()
    + moe_keys("num_experts", "num_local_experts", 128, 8)
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
    keys=with_defaults(size_keys(151936, 2048, 5632, 16, 16, 32768), num_hidden_layers=24)
    + common_keys()
    + moe_keys("num_experts", "num_local_experts", 60, 4)
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
    keys=size_keys(32000, 4096, 14336, 32, 8, 131072)
    + with_defaults(common_keys(), rms_norm_eps=1e-5, rope_theta=1e6)
    + moe_keys("num_local_experts", "num_experts", 8, 2)
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

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a for a in (_LLAMA, _QWEN2, _QWEN3, _QWEN2_MOE, _QWEN3_MOE, _MIXTRAL, DEEPSEEK_V2, DEEPSEEK_V3)
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
