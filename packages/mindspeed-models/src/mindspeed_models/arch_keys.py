"""Building blocks of the architecture registry: :class:`HFKey`, :class:`Architecture` and the key
groups several architectures share (sizes, common keys, sliding windows, MoE router keys).

Pure data, no torch or megatron import; :mod:`mindspeed_models.architectures` assembles the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Architecture", "HFKey", "common_keys", "moe_keys", "size_keys", "sliding_keys", "with_defaults"]


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


def size_keys(vocab: int, hidden: int, ffn: int, heads: int, kv_heads: int | None, max_pos: int) -> tuple[HFKey, ...]:
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


def common_keys() -> tuple[HFKey, ...]:
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


def sliding_keys(default_window: int) -> tuple[HFKey, ...]:
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


def with_defaults(keys: tuple[HFKey, ...], **defaults) -> tuple[HFKey, ...]:
    """``keys`` with the transformers defaults of some of them changed (per-architecture defaults)."""
    return tuple(replace(k, default=defaults[k.name]) if k.name in defaults else k for k in keys)


def moe_keys(experts: str, alias: str, experts_default: int, topk_default: int) -> tuple[HFKey, ...]:
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
