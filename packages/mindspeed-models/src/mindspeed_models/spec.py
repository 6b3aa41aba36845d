"""Layer specs: megatron-core's local (non-TransformerEngine) GPT layer with our kernels inside.

Parameter names are those of megatron's ``get_gpt_layer_local_spec`` (``input_layernorm``,
``self_attention.linear_qkv``, ``q_layernorm``/``k_layernorm``, ``linear_proj``,
``pre_mlp_layernorm``, ``mlp.linear_fc1``/``linear_fc2``), so checkpoints and name maps written for
that spec apply unchanged. Replaced inside: core attention (:class:`~mindspeed_models.attention.FlashAttention`),
norms (:class:`~mindspeed_models.layers.RMSNorm`) and the MLP activation
(:class:`~mindspeed_models.layers.SwiGLU`).
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from mindspeed_models.architectures import Architecture
from mindspeed_models.attention import FlashAttention
from mindspeed_models.layers import RMSNorm, SwiGLU

__all__ = ["block_submodules", "dense_layer_spec", "layer_specs"]


def dense_layer_spec(config: TransformerConfig, *, qk_norm: bool) -> ModuleSpec:
    """A pre-norm GPT layer: RMSNorm -> causal self-attention -> RMSNorm -> SwiGLU MLP (config.ffn_hidden_size).

    ``qk_norm`` adds per-head RMSNorms on q and k (Qwen3), applied before RoPE.
    """
    qk_layernorm = RMSNorm if qk_norm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=FlashAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_layernorm,
                    k_layernorm=qk_layernorm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            # Every MLP built from these specs must name an activation module: the config sets
            # use_te_activation_func, without which megatron would skip it (see config.py).
            mlp=ModuleSpec(
                module=MLP,
                params={"ffn_hidden_size": config.ffn_hidden_size},
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, activation_func=SwiGLU, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
            # As megatron's local spec: torch_dist checkpoints then match TransformerEngine models,
            # whose norms are fused into the following linear layers.
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


_BUILDERS = {"dense": lambda arch, config: dense_layer_spec(config, qk_norm=arch.qk_norm)}
"""layer_kind -> builder(arch, config) of one layer's spec; MoE/MLA kinds slot in here."""


def layer_specs(arch: Architecture, config: TransformerConfig) -> tuple[ModuleSpec, ...]:
    """One spec per global layer (index 0 .. num_layers - 1) for ``arch``."""
    try:
        build = _BUILDERS[arch.layer_kind]
    except KeyError:
        known = sorted(_BUILDERS)
        raise ValueError(f"layer_kind={arch.layer_kind!r} of {arch.model_type} has no spec builder; known: {known}") from None
    spec = build(arch, config)
    return (spec,) * config.num_layers


def block_submodules(
    specs: tuple[ModuleSpec, ...], config: TransformerConfig, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """This pipeline stage's slice of ``specs`` and the final norm, for megatron's TransformerBlock."""
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=list(specs[offset : offset + count]), layer_norm=RMSNorm)
