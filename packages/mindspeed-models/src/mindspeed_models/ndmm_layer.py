"""The NDMM transformer layer: a pre-norm GPT layer (RMSNorm, causal GQA self-attention with RoPE,
RMSNorm, SwiGLU MLP) whose linear layers are NDMM layers over megatron's TP group (``tp`` ranks,
rank ``t``; n = heads / tp and g = query groups / tp per rank, d head dim)::

    layer input / residual    [S, B, H/tp]     hidden block t (the stage's first layer cuts it from
                                               megatron's [S, B, H]; the last gathers it back)
    input_layernorm           NdNorm (statistics over the TP group)
    linear_qkv  (grid nd1)    -> [S, B, g (n/g + 2) d]   query groups block t, as megatron's TP
    rotary, core attention    local heads over the whole sequence (causal)
    linear_proj (grid nd2)    [S, B, n d] -> [S, B, H/tp]
    MLP                       NdNorm, fc1 (nd1) -> [S, B, 2F/tp] (= [gate_t | up_t]), SwiGLU
                              -> [S, B, F/tp], fc2 (nd2) -> [S, B, H/tp]

Parameter names and torch_dist keys are those of megatron's local GPT layer; per-head q/k norms
are whole on every rank and their partial weight gradients are summed over the TP group by
megatron's ``finalize_model_grads`` (``qk_layernorm``), as for megatron's own TP.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mindspeed_kernels import ops
from mindspeed_models.attention import FlashAttention
from mindspeed_models.layers import RMSNorm
from mindspeed_models.ndmm import NdLinear, NDMMSettings, NdNorm
from mindspeed_models.tp2d_layer import GridTransformerLayer, rotate, split_qkv
from mindspeed_parallel.ndmm import gather_nd, split_nd

__all__ = ["NDMMMLP", "NDMMSelfAttention", "NDMMTransformerLayer"]


class NDMMSelfAttention(MegatronModule):
    """Causal GQA self-attention with NDMM projections: ``forward(h [S, B, H/tp], attention_mask,
    rotary_pos_emb) -> [S, B, H/tp]``; ``attention_mask``: None or megatron's bool [B or 1, 1, S, S]
    (True = hidden) on top of causality."""

    def __init__(self, config: TransformerConfig, layer_number: int, grid: NDMMSettings, qk_norm: bool) -> None:
        super().__init__(config=config)
        self.head_dim = config.kv_channels
        self.heads, self.groups = config.num_attention_heads // grid.tp, config.num_query_groups // grid.tp
        # Construction order as megatron's SelfAttention (core attention, proj, qkv, q/k norms), so
        # host-side initialisation draws the same weights as the plain model.
        self.core_attention = FlashAttention(config, layer_number, AttnMaskType.causal, "self",
                                             softmax_scale=config.softmax_scale)  # fmt: skip
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_query_groups * self.head_dim
        self.linear_proj = NdLinear(q_size, config.hidden_size, config=config, init_method=config.output_layer_init_method,
                                    bias=config.add_bias_linear, groups=grid.second)  # fmt: skip
        self.linear_qkv = NdLinear(config.hidden_size, q_size + 2 * kv_size, config=config, init_method=config.init_method,
                                   bias=config.add_bias_linear or config.add_qkv_bias, groups=grid.first)  # fmt: skip
        norm = (lambda: RMSNorm(config, self.head_dim, config.layernorm_epsilon)) if qk_norm else (lambda: None)
        self.q_layernorm, self.k_layernorm = norm(), norm()

    def forward(self, hidden_states: torch.Tensor, attention_mask, rotary_pos_emb) -> torch.Tensor:
        mixed, _ = self.linear_qkv(hidden_states)
        query, key, value = split_qkv(mixed, self.heads, self.groups, self.head_dim, self.q_layernorm, self.k_layernorm)
        if rotary_pos_emb is not None:
            q_angles, k_angles = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            query, key = rotate(query, q_angles, 0), rotate(key, k_angles, 0)
        out, _ = self.linear_proj(self.core_attention(query, key, value, attention_mask))
        return out


class NDMMMLP(MegatronModule):
    """SwiGLU MLP with NDMM layers: ``[S, B, H/tp] -> [S, B, H/tp]``; ``linear_fc1``'s output block is
    ``[gate_t | up_t]`` (its stride 2), so SwiGLU applies locally."""

    def __init__(self, config: TransformerConfig, grid: NDMMSettings) -> None:
        super().__init__(config=config)
        if config.activation_func is not torch.nn.functional.silu:
            raise ValueError("NDMMMLP: NDMM layers implement the SwiGLU MLP only (activation_func=F.silu, gated)")
        self.linear_fc1 = NdLinear(config.hidden_size, 2 * config.ffn_hidden_size, config=config,
                                   init_method=config.init_method, bias=config.add_bias_linear, groups=grid.first,
                                   stride=2)  # fmt: skip
        self.linear_fc2 = NdLinear(config.ffn_hidden_size, config.hidden_size, config=config,
                                   init_method=config.output_layer_init_method, bias=config.add_bias_linear,
                                   groups=grid.second)  # fmt: skip

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        intermediate, _ = self.linear_fc1(hidden_states)
        out, _ = self.linear_fc2(ops.swiglu(intermediate))
        return out


class NDMMTransformerLayer(GridTransformerLayer):
    """The NDMM layer (``grid``: :class:`~mindspeed_models.ndmm.NDMMSettings`): the first layer of a
    stage cuts megatron's ``[S, B, H]`` with :func:`~mindspeed_parallel.ndmm.split_nd`, the last
    returns it through :func:`~mindspeed_parallel.ndmm.gather_nd`; in between ``[S, B, H/tp]``."""

    def _build(self, config: TransformerConfig, grid: NDMMSettings, qk_norm: bool) -> None:
        eps = config.layernorm_epsilon
        self.input_layernorm = NdNorm(config, config.hidden_size, eps, grid)
        self.self_attention = NDMMSelfAttention(config, self.layer_number, grid, qk_norm)
        self.pre_mlp_layernorm = NdNorm(config, config.hidden_size, eps, grid)
        self.mlp = NDMMMLP(config, grid)

    def _split(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return split_nd(hidden_states, self.grid.first.x_group, self.grid.first.y_group)

    def _gather(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gather_nd(hidden_states, self.grid.first.x_group, self.grid.first.y_group)

    def extra_repr(self) -> str:
        f, s = self.grid.first, self.grid.second
        return (f"layer_number={self.layer_number}, tp={self.grid.tp}, nd1={f.tp_x}x{f.tp_y}, nd2={s.tp_x}x{s.tp_y}, "
                f"first={self.first_on_stage}, last={self.last_on_stage}")
