"""Layer specs: megatron-core's local (non-TransformerEngine) GPT layer with our kernels inside.

Parameter names are those of megatron's ``get_gpt_layer_local_spec`` (``input_layernorm``,
``self_attention.linear_qkv``, ``q_layernorm``/``k_layernorm``, ``linear_proj``,
``pre_mlp_layernorm``, ``mlp.linear_fc1``/``linear_fc2``), so checkpoints and name maps written for
that spec apply unchanged. Replaced inside: q/k rotation (:class:`~mindspeed_models.self_attention.KernelRopeSelfAttention`),
core attention (:class:`~mindspeed_models.attention.FlashAttention`),
norms (:class:`~mindspeed_models.layers.RMSNorm`), the MLP activation
(:class:`~mindspeed_models.layers.SwiGLU`) and, for dense MLPs, fc1's output layout
(:class:`~mindspeed_models.mlp.SwiGLUMLP`: [gate; up] as two contiguous blocks).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlock,
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
)
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
from mindspeed_models.mla import mla_layer_spec
from mindspeed_models.mlp import ActivationRecomputeMLP, SwiGLUMLP
from mindspeed_models.moe import DeepSeekRouter, DeepSeekRouting, GroupedSwiGLUExperts
from mindspeed_models.self_attention import KernelRopeSelfAttention

__all__ = ["block_submodules", "dense_layer_spec", "layer_specs", "moe_layer_spec", "mtp_block_spec"]


def _swiglu_mlp() -> MLPSubmodules:
    # Every MLP built from these specs must name an activation module: the config sets
    # use_te_activation_func, without which megatron would skip it (see config.py).
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, activation_func=SwiGLU, linear_fc2=RowParallelLinear)


def dense_layer_spec(config: TransformerConfig, *, qk_norm: bool, recompute_activation: bool = False) -> ModuleSpec:
    """A pre-norm GPT layer: RMSNorm -> causal self-attention -> RMSNorm -> SwiGLU MLP (config.ffn_hidden_size).

    ``qk_norm`` adds per-head RMSNorms on q and k (Qwen3), applied before RoPE. ``recompute_activation``:
    the MLP is :class:`~mindspeed_models.mlp.ActivationRecomputeMLP` (activation output recomputed).
    """
    module = ActivationRecomputeMLP if recompute_activation else SwiGLUMLP
    mlp = ModuleSpec(module=module, params={"ffn_hidden_size": config.ffn_hidden_size}, submodules=_swiglu_mlp())
    # As megatron's local spec: torch_dist checkpoints then match TransformerEngine models,
    # whose norms are fused into the following linear layers.
    keys_map = {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
    }
    return _layer_spec(mlp, keys_map, qk_norm=qk_norm)


def moe_layer_spec(config: TransformerConfig, *, qk_norm: bool, router: Any = None) -> ModuleSpec:
    """A pre-norm GPT layer whose MLP is megatron's MoELayer: router (``mlp.router.weight``
    [experts, hidden]) and ``SequentialMLP`` experts (``mlp.experts.local_experts.{e}.linear_fc1``
    [2 x moe_ffn, hidden] = [gate | up], ``linear_fc2`` [hidden, moe_ffn]), each a SwiGLU MLP.

    Routing, top-k and token dispatch follow the ``moe_*`` fields of the TransformerConfig;
    ``config.moe_grouped_gemm`` swaps the experts' forward for one grouped GEMM per projection
    (:class:`~mindspeed_models.moe.GroupedSwiGLUExperts`, same parameters and names).
    ``config.moe_shared_expert_intermediate_size`` adds megatron's ungated ``SharedExpertMLP``
    (``mlp.shared_experts.linear_fc1``/``linear_fc2``, SwiGLU) whose output is added to the experts';
    ``config.moe_shared_expert_gate`` scales it by ``sigmoid(x . mlp.shared_experts.gate_weight)`` (Qwen2-MoE).
    ``router``: a builder ``(config=, pg_collection=)`` of the router (None: megatron's ``TopKRouter``).
    """
    experts = GroupedSwiGLUExperts if config.moe_grouped_gemm else SequentialMLP
    shared = None
    if config.moe_shared_expert_intermediate_size:
        shared = ModuleSpec(module=SharedExpertMLP, submodules=_swiglu_mlp())
    extra = {} if router is None else {"router": router}
    submodules = MoESubmodules(experts=ModuleSpec(module=experts, submodules=_swiglu_mlp()), shared_experts=shared, **extra)
    mlp = ModuleSpec(module=MoELayer, submodules=submodules, metainfo={"fuse_pre_mlp_layernorm": False})
    # A TransformerEngine MoE layer keeps pre_mlp_layernorm separate: only the attention norm is fused.
    return _layer_spec(mlp, {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}, qk_norm=qk_norm)


def _layer_spec(mlp: ModuleSpec, keys_map: dict[str, str], *, qk_norm: bool) -> ModuleSpec:
    qk_layernorm = RMSNorm if qk_norm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=KernelRopeSelfAttention,
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
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def _moe_flags(config: TransformerConfig) -> list[int]:
    freq = config.moe_layer_freq
    if not isinstance(freq, list):
        # config.py maps the HF keys only to 1 or a list; an int override N means every N-th layer, as megatron.
        freq = [int(i % freq == 0) for i in range(config.num_layers)]
    return freq


def _moe_layers(arch: Architecture, config: TransformerConfig, options: Mapping[str, Any]) -> tuple[ModuleSpec, ...]:
    """MoE layers where ``config.moe_layer_freq`` is 1 (an int 1 = every layer), dense SwiGLU MLPs elsewhere."""
    moe, dense = moe_layer_spec(config, qk_norm=arch.qk_norm), _dense(arch, config, options)
    return tuple(moe if flag else dense for flag in _moe_flags(config))


def _mla(layer: ModuleSpec) -> ModuleSpec:
    # MLA's input norm stays a separate module (TransformerEngine fuses the latent norms instead),
    # so the fused-qkv key alias of the GQA specs does not apply.
    layer = mla_layer_spec(layer)
    keys_map = {k: v for k, v in layer.submodules.sharded_state_dict_keys_map.items() if k != "input_layernorm."}
    return dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, sharded_state_dict_keys_map=keys_map))


def _mla_moe_layers(arch: Architecture, config: TransformerConfig, options: Mapping[str, Any]) -> tuple[ModuleSpec, ...]:
    """DeepSeek-V3: MLA everywhere; dense SwiGLU MLPs where ``moe_layer_freq`` is 0 (the first k layers), else
    MoE with :class:`~mindspeed_models.moe.DeepSeekRouter` (``options["deepseek_routing"]``) and shared experts."""
    router = functools.partial(DeepSeekRouter, routing=options.get("deepseek_routing", DeepSeekRouting()))
    moe = _mla(moe_layer_spec(config, qk_norm=arch.qk_norm, router=router))
    dense = _mla(_dense(arch, config, options))
    return tuple(moe if flag else dense for flag in _moe_flags(config))


def _dense(arch: Architecture, config: TransformerConfig, options: Mapping[str, Any]) -> ModuleSpec:
    return dense_layer_spec(config, qk_norm=arch.qk_norm, recompute_activation=options.get("recompute_activation", False))


_BUILDERS = {
    "dense": lambda arch, config, options: (_dense(arch, config, options),) * config.num_layers,
    "moe": _moe_layers,
    "mla_moe": _mla_moe_layers,
}
"""layer_kind -> builder(arch, config, options) of every global layer's spec."""


def layer_specs(
    arch: Architecture, config: TransformerConfig, options: Mapping[str, Any] | None = None
) -> tuple[ModuleSpec, ...]:
    """One spec per global layer (index 0 .. num_layers - 1) for ``arch``.

    ``options``: builder settings that are not TransformerConfig fields (``mla_moe``:
    ``deepseek_routing``, a :class:`~mindspeed_models.moe.DeepSeekRouting`; any kind:
    ``recompute_activation``, dense MLPs as :class:`~mindspeed_models.mlp.ActivationRecomputeMLP`).
    """
    try:
        build = _BUILDERS[arch.layer_kind]
    except KeyError:
        known = sorted(_BUILDERS)
        raise ValueError(f"layer_kind={arch.layer_kind!r} of {arch.model_type} has no spec builder; known: {known}") from None
    return build(arch, config, options or {})


def block_submodules(
    specs: tuple[ModuleSpec, ...], config: TransformerConfig, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """This pipeline stage's slice of ``specs`` and the final norm, for megatron's TransformerBlock."""
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=list(specs[offset : offset + count]), layer_norm=RMSNorm)


def mtp_block_spec(specs: tuple[ModuleSpec, ...], config: TransformerConfig) -> ModuleSpec | None:
    """megatron's MultiTokenPredictionBlock of ``config.mtp_num_layers`` layers (None without MTP).

    MTP layer k (DeepSeek-V3 section 2.2): ``eh_proj([enorm(embed(tokens shifted by k)) | hnorm(h)])``
    [2H -> H], then one transformer layer built like the last decoder layer (``specs[-1]``: MLA + MoE
    for DeepSeek-V3), then ``final_layernorm`` (HF ``shared_head.norm``) before the shared output layer.
    Parameter names ``mtp.layers.{k}.enorm|hnorm|eh_proj|final_layernorm|transformer_layer.*``.
    """
    if not config.mtp_num_layers:
        return None
    layer = ModuleSpec(
        module=MultiTokenPredictionLayer,
        submodules=MultiTokenPredictionLayerSubmodules(
            enorm=RMSNorm, hnorm=RMSNorm, eh_proj=ColumnParallelLinear, transformer_layer=specs[-1], layer_norm=RMSNorm
        ),
    )
    submodules = MultiTokenPredictionBlockSubmodules(layer_specs=[layer] * config.mtp_num_layers)
    return ModuleSpec(module=MultiTokenPredictionBlock, submodules=submodules)
