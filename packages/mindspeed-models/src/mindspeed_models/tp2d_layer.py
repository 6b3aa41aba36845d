"""The TP-2D transformer layer: a pre-norm GPT layer (RMSNorm, causal GQA self-attention with RoPE,
RMSNorm, SwiGLU MLP) whose linear layers and norms are split over a ``tp_x x tp_y`` grid.

Layouts (S sequence, B batch, H hidden, F ffn, n = heads / tp_x and g = query groups / tp_x per
rank, d head dim; rank (x, y) of the grid; ``[S/X rows x, H/Y cols y]`` = rows block x, columns
block y)::

    layer input / residual    [S/X, B, H/Y]        (the stage's first layer cuts it from megatron's
                                                     [S, B, H]; the last gathers it back)
    input_layernorm           Norm2D
    linear_qkv (ag x, rs y)   -> [S/Y, B, g (n/g + 2) d]   query groups block x, sequence block y
    rotary                    on the positions of sequence block y
    keys / values             all-gathered over the y group: [S, B, g, d], cut to the first
                              (y + 1) S/Y rows (later keys are all masked for these queries)
    core attention            queries [S/Y, B, n, d] against them, causal aligned bottom-right
                              (= each query sees keys up to its own global position)
    linear_proj (ag y, rs x)  [S/Y, B, n d] -> [S/X, B, H/Y]
    MLP                       Norm2D, fc1 (ag x, rs y) -> [S/Y, B, 2F/X] (= [gate_x | up_x]),
                              SwiGLU -> [S/Y, B, F/X], fc2 (ag y, rs x) -> [S/X, B, H/Y]

Parameter names are those of megatron's local GPT layer (``input_layernorm.weight``,
``self_attention.linear_qkv.weight``/``bias``, ``q_layernorm``/``k_layernorm``, ``linear_proj``,
``pre_mlp_layernorm``, ``mlp.linear_fc1``/``linear_fc2``); torch_dist checkpoints hold the full
tensors under megatron's keys. Per-head q/k norms are whole on every rank; their partial weight
gradients are summed over the TP group by megatron's ``finalize_model_grads`` (``qk_layernorm``).
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.utils import apply_prefix_mapping
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor_from_config
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from mindspeed_kernels import ops
from mindspeed_models.attention import FlashAttention
from mindspeed_models.layers import RMSNorm
from mindspeed_models.tp2d import Linear2D, Norm2D, TP2DSettings
from mindspeed_parallel.tp2d import gather_2d, split_2d
from mindspeed_parallel.tp2d.comm import all_gather_first, group_rank, reduce_scatter_first

__all__ = ["GridTransformerLayer", "TP2DMLP", "TP2DSelfAttention", "TP2DTransformerLayer", "rotate", "split_qkv"]


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 over ``group``; backward reduce-scatters (each rank used all rows)."""

    @staticmethod
    def forward(ctx, local, group):
        ctx.group = group
        return all_gather_first(local.contiguous(), group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_first(grad.contiguous(), ctx.group), None


class TP2DSelfAttention(MegatronModule):
    """Causal GQA self-attention over the grid: ``forward(h [S/X, B, H/Y], attention_mask, rotary_pos_emb)
    -> [S/X, B, H/Y]`` (module docstring for the layouts). ``attention_mask``: None or megatron's
    bool [B or 1, 1, S, S] (True = hidden) on top of causality."""

    def __init__(self, config: TransformerConfig, layer_number: int, tp2d: TP2DSettings, qk_norm: bool) -> None:
        super().__init__(config=config)
        tp_x = tp2d.groups.tp_x
        self.tp2d, self.head_dim = tp2d, config.kv_channels
        self.heads, self.groups = config.num_attention_heads // tp_x, config.num_query_groups // tp_x
        # Construction order as megatron's SelfAttention (core attention, proj, qkv, q/k norms), so
        # host-side initialisation draws the same weights as the plain model.
        self.core_attention = FlashAttention(config, layer_number, AttnMaskType.causal_bottom_right, "self",
                                             softmax_scale=config.softmax_scale)  # fmt: skip
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_query_groups * self.head_dim
        self.linear_proj = Linear2D(q_size, config.hidden_size, config=config, init_method=config.output_layer_init_method,
                                    bias=config.add_bias_linear, tp2d=tp2d, ag="y")  # fmt: skip
        self.linear_qkv = Linear2D(config.hidden_size, q_size + 2 * kv_size, config=config, init_method=config.init_method,
                                   bias=config.add_bias_linear or config.add_qkv_bias, tp2d=tp2d, ag="x")  # fmt: skip
        norm = (lambda: RMSNorm(config, self.head_dim, config.layernorm_epsilon)) if qk_norm else (lambda: None)
        self.q_layernorm, self.k_layernorm = norm(), norm()

    def forward(self, hidden_states: torch.Tensor, attention_mask, rotary_pos_emb) -> torch.Tensor:
        mixed, _ = self.linear_qkv(hidden_states)
        rows = mixed.shape[0]
        query, key, value = split_qkv(mixed, self.heads, self.groups, self.head_dim, self.q_layernorm, self.k_layernorm)
        y_group = self.tp2d.groups.y_group
        y = group_rank(y_group)
        if rotary_pos_emb is not None:
            q_angles, k_angles = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            query, key = rotate(query, q_angles, y * rows), rotate(key, k_angles, y * rows)
        visible = (y + 1) * rows  # keys after this rank's last query are masked for all of its queries
        key = _GatherRows.apply(key, y_group)[:visible]
        value = _GatherRows.apply(value, y_group)[:visible]
        mask = _mask_rows(attention_mask, y * rows, rows, visible)
        out = self.core_attention(query, key, value, mask)
        out, _ = self.linear_proj(out)
        return out


def split_qkv(mixed: torch.Tensor, heads: int, groups: int, head_dim: int, q_norm=None, k_norm=None):
    """Megatron's fused QKV output ``[s, B, groups (heads/groups + 2) head_dim]`` (per query group:
    its query heads, then one key and one value) -> query [s, B, heads, d], key and value
    [s, B, groups, d], with the per-head norms applied to query and key when given."""
    rows, batch = mixed.shape[:2]
    per_group = heads // groups
    mixed = mixed.view(rows, batch, groups, (per_group + 2) * head_dim)
    query, key, value = torch.split(mixed, [per_group * head_dim, head_dim, head_dim], dim=-1)
    query = query.reshape(rows, batch, heads, head_dim)
    if q_norm is not None:
        query, key = q_norm(query), k_norm(key)
    return query, key, value


def rotate(x: torch.Tensor, angles: torch.Tensor, start: int) -> torch.Tensor:
    """``x`` [s, B, N, d] at global positions ``start .. start + s`` rotated by ``angles`` [>= S, 1, 1, R]."""
    angles = angles[start : start + x.shape[0]]
    return ops.rotary_pos_emb(x, torch.cos(angles), torch.sin(angles))


def _mask_rows(mask, start: int, rows: int, visible: int):
    """Megatron's [B, 1, S, S] mask cut to this rank's queries and visible keys (None stays None)."""
    if mask is None:
        return None
    if mask.shape[-2] != 1:
        mask = mask[..., start : start + rows, :]
    return mask[..., :visible] if mask.shape[-1] != 1 else mask


class TP2DMLP(MegatronModule):
    """SwiGLU MLP over the grid: ``[S/X, B, H/Y] -> [S/X, B, H/Y]``; ``linear_fc1`` holds this rank's
    gate and up rows ``[gate_x | up_x]`` (megatron's fc1 stride 2), so SwiGLU applies locally."""

    def __init__(self, config: TransformerConfig, tp2d: TP2DSettings) -> None:
        super().__init__(config=config)
        if config.activation_func is not F.silu:
            raise ValueError("TP2DMLP: TP-2D layers implement the SwiGLU MLP only (activation_func=F.silu, gated)")
        self.linear_fc1 = Linear2D(config.hidden_size, 2 * config.ffn_hidden_size, config=config,
                                   init_method=config.init_method, bias=config.add_bias_linear, tp2d=tp2d, ag="x",
                                   stride=2)  # fmt: skip
        self.linear_fc2 = Linear2D(config.ffn_hidden_size, config.hidden_size, config=config,
                                   init_method=config.output_layer_init_method, bias=config.add_bias_linear, tp2d=tp2d,
                                   ag="y")  # fmt: skip

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        intermediate, _ = self.linear_fc1(hidden_states)
        out, _ = self.linear_fc2(ops.swiglu(intermediate))
        return out


class GridTransformerLayer(MegatronModule, abc.ABC):
    """A megatron ``TransformerLayer`` replacement over a tensor-parallel grid (same constructor
    keywords from TransformerBlock, ``forward(hidden_states, attention_mask, ..., rotary_pos_emb, ...)
    -> (hidden_states, context)``): pre-norm attention and MLP sublayers with residuals.

    Subclasses build the sublayers (``_build``, in megatron's construction order so host-side
    initialisation draws the plain model's weights) and say how the first layer of a pipeline stage
    cuts megatron's ``[S, B, H]`` into this rank's block (``_split``) and the last one gathers it
    back (``_gather``). ``grid``: the subclass's settings; ``keys_map``: the torch_dist key renames
    of the plain layer spec (its fused-norm aliases).
    """

    def __init__(self, config: TransformerConfig, layer_number: int = 1, *, grid, qk_norm: bool = False,
                 keys_map: dict | None = None, pg_collection=None, vp_stage: int | None = None, **unused) -> None:  # fmt: skip
        super().__init__(config=config)
        if config.rotary_interleaved or _yarn_get_concentration_factor_from_config(config) != 1.0:
            raise ValueError(f"{type(self).__name__}: interleaved rotary / YaRN mscale on the rotation is not implemented")
        pp_rank = None if pg_collection is None else pg_collection.pp.rank()
        self.layer_number = layer_number + get_transformer_layer_offset(config, vp_stage, pp_rank)
        self.first_on_stage = layer_number == 1
        self.last_on_stage = layer_number == get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        self.grid, self.keys_map = grid, dict(keys_map or {})
        self._build(config, grid, qk_norm)

    @abc.abstractmethod
    def _build(self, config: TransformerConfig, grid, qk_norm: bool) -> None:
        """Set ``input_layernorm``, ``self_attention``, ``pre_mlp_layernorm`` and ``mlp``."""

    @abc.abstractmethod
    def _split(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Megatron's ``[S, B, H]`` -> this rank's block (the stage's first layer)."""

    @abc.abstractmethod
    def _gather(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """This rank's block -> megatron's ``[S, B, H]`` (the stage's last layer)."""

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None, rotary_pos_emb=None,
                rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                inference_context=None, packed_seq_params=None, sequence_len_offset=None, **unused):  # fmt: skip
        unsupported = {"packed (THD) sequences": packed_seq_params is not None, "an attention_bias": attention_bias is not None,
                       "inference with a KV cache": inference_context is not None or unused.get("inference_params")}  # fmt: skip
        for what, present in unsupported.items():
            if present:
                raise ValueError(f"{type(self).__name__}: {what} is not implemented yet")
        h = self._split(hidden_states) if self.first_on_stage else hidden_states
        h = h + self._dropout(self.self_attention(self.input_layernorm(h), attention_mask, rotary_pos_emb))
        h = h + self._dropout(self.mlp(self.pre_mlp_layernorm(h)))
        return (self._gather(h) if self.last_on_stage else h), context

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, p=self.config.hidden_dropout, training=self.training) if self.config.hidden_dropout else x

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """megatron's keys (with the plain layer's fused-norm renames) for the full tensors."""
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        mapping = {f"{prefix}{k}": f"{prefix}{v}" for k, v in self.keys_map.items()}
        if mapping:
            apply_prefix_mapping(out, mapping)
        return out


class TP2DTransformerLayer(GridTransformerLayer):
    """The TP-2D layer (``grid``: :class:`~mindspeed_models.tp2d.TP2DSettings`): the first layer of a
    stage cuts megatron's ``[S, B, H]`` with :func:`~mindspeed_parallel.tp2d.split_2d`, the last
    returns it through :func:`~mindspeed_parallel.tp2d.gather_2d`; in between ``[S/X, B, H/Y]``."""

    def _build(self, config: TransformerConfig, grid: TP2DSettings, qk_norm: bool) -> None:
        eps = config.layernorm_epsilon
        self.input_layernorm = Norm2D(config, config.hidden_size, eps, grid)
        self.self_attention = TP2DSelfAttention(config, self.layer_number, grid, qk_norm)
        self.pre_mlp_layernorm = Norm2D(config, config.hidden_size, eps, grid)
        self.mlp = TP2DMLP(config, grid)

    def _split(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return split_2d(hidden_states, self.grid.groups.x_group, self.grid.groups.y_group)

    def _gather(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return gather_2d(hidden_states, self.grid.groups.x_group, self.grid.groups.y_group)

    def extra_repr(self) -> str:
        g = self.grid.groups
        return f"layer_number={self.layer_number}, grid={g.tp_x}x{g.tp_y}, first={self.first_on_stage}, last={self.last_on_stage}"
