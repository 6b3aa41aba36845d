"""NDMM in a megatron-core GPT model: decoder layers whose linear layers are mindspeed-parallel's
NDMM layers (``--use-nd-matmul --nd1-dim1-size D1 --nd2-dim1-size D2``).

Megatron's tensor-parallel group (``tp`` ranks) holds every token; the residual stream between
decoder layers is split along the hidden dimension, ``[S, B, H/tp]`` (columns block ``t`` = this
rank's TP index). The first matmul of each block (QKV, fc1) splits its weight over a ``D1 x tp/D1``
grid of the TP group, the second (proj, fc2) over a ``D2 x tp/D2`` grid
(:mod:`mindspeed_parallel.ndmm` has the layouts and the communication). The embedding and the
output layer stay megatron's vocabulary-parallel layers over the whole group; layers are in
:mod:`mindspeed_models.ndmm_layer`.

:func:`enable_ndmm` turns a :class:`~mindspeed_models.config.ModelSpec` of a dense GQA model (llama /
qwen2 / qwen3 style: RMSNorm, SwiGLU, causal RoPE attention, query groups divisible by ``tp``)
into its NDMM version; :func:`~mindspeed_models.build_model` builds it as usual. Parameter names,
host-side initial values and torch_dist checkpoint keys are those of the plain megatron model, so
an NDMM model computes the function of the TP=1 model and loads (and saves) the same checkpoints.
Combines with context parallelism; not combinable (refused): MoE, MLA, MTP, sequence parallelism.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.transformer_config import TransformerConfig

from mindspeed_models.config import ModelSpec
from mindspeed_models.layers import param_device
from mindspeed_models.tp2d import MegatronLinearState, check_grid_model, counted, dp_rank, grid_layer_specs
from mindspeed_parallel.ndmm import NdParallelLinear, make_ndmm_groups, shard_nd_linear
from mindspeed_parallel.tp2d import RMSNorm2D, TP2DGroups
from mindspeed_parallel.tp2d.comm import group_rank, group_size

__all__ = ["NDMMSettings", "NdLinear", "NdNorm", "check_ndmm_model", "enable_ndmm", "make_ndmm_settings"]


@dataclass(frozen=True)
class NDMMSettings:
    """This rank's two NDMM grids over megatron's TP group: ``first`` (``dim1`` size nd1, for QKV and
    fc1) and ``second`` (nd2, for proj and fc2), as :class:`~mindspeed_parallel.tp2d.TP2DGroups`
    (``x_group`` = dim1, ``y_group`` = dim2), and the TP group itself (norm statistics)."""

    first: TP2DGroups
    second: TP2DGroups
    tp_group: dist.ProcessGroup

    @property
    def tp(self) -> int:
        return self.first.tp_x * self.first.tp_y

    @property
    def rank(self) -> int:
        """This rank's TP index ``t``: its block of the split hidden dimension."""
        return self.first.y * self.first.tp_x + self.first.x


def make_ndmm_settings(tp_group: dist.ProcessGroup, nd1_dim1_size: int, nd2_dim1_size: int) -> NDMMSettings:
    """The grids over megatron's tensor-parallel group ``tp_group`` (collective over its ranks: all of
    them call this, each TP group of the job with the same sizes)."""
    ranks = dist.get_process_group_ranks(tp_group)
    first = make_ndmm_groups(ranks, nd1_dim1_size)
    second = first if nd2_dim1_size == nd1_dim1_size else make_ndmm_groups(ranks, nd2_dim1_size)
    return NDMMSettings(first, second, tp_group)


class NdLinear(MegatronLinearState, NdParallelLinear):
    """A megatron linear layer (``forward(x) -> (output, None)``, bias added) computed by
    :func:`mindspeed_parallel.ndmm.nd_linear` over ``groups`` (one of :class:`NDMMSettings`' grids).

    ``stride`` 2 (fc1): megatron's full weight is ``[gate | up]`` rows; the NDMM output block ``t``
    must be ``[gate_t | up_t]`` so SwiGLU applies locally, so the layer's "full" weight is those
    blocks interleaved. With ``config.use_cpu_initialization`` the full weight is drawn with
    ``init_method`` on the host and cut, as megatron does, so every layout starts from the same function.
    """

    def __init__(self, in_features: int, out_features: int, *, config: TransformerConfig, init_method: Callable,
                 bias: bool, groups: TP2DGroups, stride: int = 1) -> None:  # fmt: skip
        tp = groups.tp_x * groups.tp_y
        if out_features % (tp * stride):
            raise ValueError(f"NdLinear: out_features={out_features} must divide by {stride} x the tensor-parallel size {tp}")
        super().__init__(in_features, out_features, dim1_group=groups.x_group, dim2_group=groups.y_group, bias=bias,
                         init_method=lambda _: None, device=param_device(config), dtype=config.params_dtype)  # fmt: skip
        self.grid, self.stride, self.tp = groups, stride, tp
        if config.perform_initialization:
            self.initialise_weight(config, init_method, self._cut)
        counted(self.weight, True)  # every shard is unique to its TP rank
        if self.bias is not None:
            counted(self.bias, True)

    def _interleave(self, full: torch.Tensor) -> torch.Tensor:
        """megatron's full rows -> the NDMM view: block t = the t-th fragment of each stride part."""
        if self.stride == 1:
            return full
        parts = full.chunk(self.stride * self.tp, dim=0)
        return torch.cat([parts[s * self.tp + t] for t in range(self.tp) for s in range(self.stride)], dim=0)

    def _cut(self, full: torch.Tensor) -> torch.Tensor:
        g = self.grid
        return shard_nd_linear(self._interleave(full), None, g.x, g.tp_x, g.y, g.tp_y)[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``[*, in/tp] -> ([*, out/tp], None)``."""
        return super().forward(x), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """The shards as pieces of megatron's full ``weight`` [out, in] / ``bias`` [out] (torch_dist keys)."""
        g, n = self.grid, len(sharded_offsets)
        t = g.y * g.tp_x + g.x
        # weight rows: the OUT/tp blocks m*d1 + x (m < d2), each made of `stride` fragments
        weight_rows = [s * self.tp + m * g.tp_x + g.x for m in range(g.tp_y) for s in range(self.stride)]
        out = {f"{prefix}weight": self._pieces(f"{prefix}weight", self.weight, sharded_offsets, weight_rows,
                                               ((n + 1, g.y, g.tp_y),)),
               **self.extra_state_entry(prefix, sharded_offsets)}  # fmt: skip
        if self.bias is not None:
            bias_rows = [s * self.tp + t for s in range(self.stride)]
            out[f"{prefix}bias"] = self._pieces(f"{prefix}bias", self.bias, sharded_offsets, bias_rows, ())
        return out

    def _pieces(self, key: str, tensor: torch.Tensor, offsets: tuple, rows: list[int], col_axes: tuple):
        n, frags, replica_id = len(offsets), self.stride * self.tp, (0, 0, dp_rank())

        def build(key, data, replica_id, flattened_range):
            return [ShardedTensor.from_rank_offsets(key, part, *offsets, (n, row, frags), *col_axes,
                                                    replica_id=replica_id, prepend_axis_num=n)
                    for row, part in zip(rows, torch.chunk(data, len(rows), dim=0), strict=True)]  # fmt: skip

        def merge(parts):
            with torch.no_grad():
                return torch.cat(parts)

        return ShardedTensorFactory(key, tensor, build, merge, replica_id)


class NdNorm(RMSNorm2D):
    """megatron-style RMSNorm over the NDMM residual layout ``[S, B, H/tp]``: statistics over the TP
    group, ``weight`` [H/tp] = block ``t`` of the full [H] (every rank sees all tokens, so its
    weight gradient is complete)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float, grid: NDMMSettings) -> None:
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError("NdNorm: NDMM layers implement RMSNorm without layernorm_zero_centered_gamma only")
        super().__init__(hidden_size, grid.tp_group, eps, device=param_device(config), dtype=config.params_dtype)
        self.t, self.tp = group_rank(grid.tp_group), group_size(grid.tp_group)
        counted(self.weight, True)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        n, key = len(sharded_offsets), f"{prefix}weight"
        return {key: ShardedTensor.from_rank_offsets(key, self.weight, *sharded_offsets, (n, self.t, self.tp),
                                                     replica_id=(0, 0, dp_rank()), prepend_axis_num=n)}  # fmt: skip


def enable_ndmm(spec: ModelSpec, settings: NDMMSettings) -> ModelSpec:
    """``spec`` with every decoder layer a :class:`~mindspeed_models.ndmm_layer.NDMMTransformerLayer`
    over ``settings``' grids (same parameter names and checkpoint keys). ``spec.config`` must have
    ``tensor_model_parallel_size`` = the grids' size. Raises ValueError for models NDMM does not cover."""
    from mindspeed_models.ndmm_layer import NDMMTransformerLayer

    check_ndmm_model(spec, settings.tp)
    return grid_layer_specs(spec, NDMMTransformerLayer, settings)


def check_ndmm_model(spec: ModelSpec, tp: int) -> None:
    """Raise ValueError (one line) when the NDMM layers do not cover ``spec`` at TP size ``tp`` (no
    process groups needed: launchers call it before starting any)."""
    # Every rank holds all of its tokens' hidden blocks and attends through FlashAttention, so
    # context parallelism (mindspeed_models.context_parallel) applies to the NDMM layers unchanged.
    check_grid_model(spec, "NDMM", "--use-nd-matmul", tp, tp, "the tensor-parallel size", context_parallel=True)
