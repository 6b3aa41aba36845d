"""TP-2D in a megatron-core GPT model: transformer layers made of mindspeed-parallel's 2-D layers.

Megatron's tensor-parallel group (``tensor_model_parallel_size = tp_x * tp_y`` ranks) is split
into a ``tp_x x tp_y`` grid (:func:`mindspeed_parallel.tp2d.make_tp2d_groups`); the embedding
and the output layer stay megatron's vocabulary-parallel layers over the whole group, the decoder
layers become :class:`~mindspeed_models.tp2d_layer.TP2DTransformerLayer` (layouts there).

:func:`enable_tp2d` turns a :class:`~mindspeed_models.config.ModelSpec` of a dense GQA model
(llama / qwen2 / qwen3 style: RMSNorm, SwiGLU, causal RoPE attention) into its TP-2D version;
:func:`~mindspeed_models.build_model` then builds it as usual. Parameter names, initial values
(host-side initialisation) and torch_dist checkpoint keys are those of the plain megatron model,
so a TP-2D model computes the function of the TP=1 model and loads (and saves) the same
checkpoints. Not combinable (refused): MoE, MLA, MTP, context or sequence parallelism.

The building blocks here: :class:`Linear2D` (megatron's linear interface around
``ParallelLinear2D``), :class:`Norm2D` (``RMSNorm2D`` with megatron's norm interface) and
:class:`TP2DSettings` (the grid's groups and the overlap options the layers share).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

from mindspeed_models.config import ModelSpec
from mindspeed_models.layers import param_device
from mindspeed_parallel.tp2d import ParallelLinear2D, RMSNorm2D, TP2DGroups, TP2DOverlap, linear_2d, make_tp2d_groups

__all__ = ["Linear2D", "MegatronLinearState", "Norm2D", "TP2DSettings", "check_grid_model", "check_tp2d_model",
           "counted", "dp_rank", "enable_tp2d", "grid_layer_specs", "make_settings"]  # fmt: skip


@dataclass(frozen=True)
class TP2DSettings:
    """This rank's ``tp_x x tp_y`` grid (x and y process groups, coordinates) and the overlap
    options of every 2-D linear layer of the model."""

    groups: TP2DGroups
    overlap: TP2DOverlap = TP2DOverlap()

    def axes(self, ag: str) -> tuple[dist.ProcessGroup, dist.ProcessGroup, int, int, int, int]:
        """``(ag_group, rs_group, ag_index, ag_size, rs_index, rs_size)`` for a layer gathering over
        axis ``ag`` ("x": qkv / fc1, "y": proj / fc2) and reduce-scattering over the other."""
        g = self.groups
        if ag == "x":
            return g.x_group, g.y_group, g.x, g.tp_x, g.y, g.tp_y
        if ag == "y":
            return g.y_group, g.x_group, g.y, g.tp_y, g.x, g.tp_x
        raise ValueError(f"TP2DSettings.axes: ag={ag!r} must be 'x' or 'y'")


def make_settings(tp_group: dist.ProcessGroup, tp_x: int, tp_y: int, overlap: TP2DOverlap | None = None) -> TP2DSettings:
    """The grid over megatron's tensor-parallel group ``tp_group`` (collective over its ranks: all
    of them call this, each TP group of the job with the same ``tp_x``/``tp_y``)."""
    ranks = dist.get_process_group_ranks(tp_group)
    return TP2DSettings(make_tp2d_groups(ranks, tp_x, tp_y), overlap or TP2DOverlap())


def dp_rank() -> int:
    """This rank's data-parallel index (with context parallelism): the replica id of its shards."""
    return ps.get_data_parallel_rank(with_context_parallel=True)


def counted(param: torch.nn.Parameter, is_counted: bool) -> None:
    # megatron's grad-norm and zero counting take a parameter from every rank that marks it
    # tensor_model_parallel, else from TP rank 0 only: a block replicated over part of the grid is
    # marked on the one replica that must count (TP rank 0 is always such a replica).
    set_tensor_model_parallel_attributes(param, is_parallel=is_counted, dim=0, stride=1)


class MegatronLinearState:
    """What a grid linear layer shares with megatron's linear layers beyond its weights: an empty
    ``_extra_state`` (in state dicts and as a torch_dist object), and its parameters' accounting."""

    def get_extra_state(self) -> None:
        """None, as megatron's linear layers (their checkpoints hold an ``_extra_state`` entry)."""
        return None

    def set_extra_state(self, state) -> None:
        """Ignored, as megatron's linear layers do."""

    def initialise_weight(self, config: TransformerConfig, init_method: Callable,
                          cut: Callable[[torch.Tensor], torch.Tensor]) -> None:  # fmt: skip
        """Draw ``self.weight`` as megatron does: with ``config.use_cpu_initialization`` the full
        ``[out_features, in_features]`` weight on the host (``init_method``), of which this rank
        keeps ``cut(full)``, so every layout starts from the same function; else each rank draws its
        own shard from the tensor-parallel RNG."""
        if not config.use_cpu_initialization:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                init_method(self.weight)
            return
        master = torch.empty(self.out_features, self.in_features, dtype=torch.float)
        init_method(master)
        with torch.no_grad():
            self.weight.copy_(cut(master.to(config.params_dtype)))

    @staticmethod
    def extra_state_entry(prefix: str, sharded_offsets: tuple) -> dict:
        """megatron's (empty) ``_extra_state`` object of the layer at ``prefix``."""
        key = f"{prefix}_extra_state"
        return {key: make_sharded_object_for_checkpoint(None, key, sharded_offsets)}


class Linear2D(MegatronLinearState, ParallelLinear2D):
    """A megatron linear layer (``forward(x) -> (output, None)``, the bias already added) computed by
    :func:`mindspeed_parallel.tp2d.linear_2d` over the grid, gathering over axis ``ag``.

    ``weight`` [out/A, in/R] is block (a, r) of the full [out, in] weight (``stride`` 2: fc1's
    [gate | up] rows, each half split over the ag axis, as megatron's ``fc1_stride``); ``bias``
    [out/A]. With ``config.use_cpu_initialization`` the full weight is drawn with ``init_method`` on
    the host and cut, as megatron does, so every layout starts from the same function.
    """

    def __init__(self, in_features: int, out_features: int, *, config: TransformerConfig, init_method: Callable,
                 bias: bool, tp2d: TP2DSettings, ag: str, stride: int = 1) -> None:  # fmt: skip
        ag_group, rs_group, self.a, self.ag_size, self.r, self.rs_size = tp2d.axes(ag)
        if out_features % (self.ag_size * stride):
            raise ValueError(f"Linear2D: out_features={out_features} must divide by {stride} x the tp_{ag} size {self.ag_size}")
        super().__init__(in_features, out_features, ag_group=ag_group, rs_group=rs_group, bias=bias, overlap=tp2d.overlap,
                         init_method=lambda _: None, device=param_device(config), dtype=config.params_dtype)  # fmt: skip
        self.stride = stride
        if config.perform_initialization:
            self.initialise_weight(config, init_method, self._cut)
        counted(self.weight, True)
        if self.bias is not None:
            counted(self.bias, self.r == 0)

    def _cut(self, full: torch.Tensor) -> torch.Tensor:
        rows = full.split(self.out_features // (self.ag_size * self.stride), dim=0)
        block = torch.cat(rows[self.a :: self.ag_size], dim=0)
        cols = self.in_features // self.rs_size
        return block[:, self.r * cols : (self.r + 1) * cols]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``[S/A, B, in/R] -> ([S/R, B, out/A], None)``."""
        return linear_2d(x, self.weight, self.bias, self.ag_group, self.rs_group, self.overlap), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """The blocks as pieces of megatron's full ``weight`` [out, in] / ``bias`` [out] (torch_dist keys),
        and megatron's (empty) ``_extra_state`` object, so plain models load TP-2D checkpoints."""
        n, dp = len(sharded_offsets), dp_rank()
        out = {f"{prefix}weight": self._sharded(f"{prefix}weight", self.weight, sharded_offsets, (0, 0, dp),
                                                 ((n + 1, self.r, self.rs_size),)),
               **self.extra_state_entry(prefix, sharded_offsets)}  # fmt: skip
        if self.bias is not None:
            out[f"{prefix}bias"] = self._sharded(f"{prefix}bias", self.bias, sharded_offsets, (0, self.r, dp), ())
        return out

    def _sharded(self, key: str, tensor, offsets: tuple, replica_id: tuple, col_axes: tuple):
        n = len(offsets)
        if self.stride == 1:
            return ShardedTensor.from_rank_offsets(key, tensor, *offsets, (n, self.a, self.ag_size), *col_axes,
                                                   replica_id=replica_id, prepend_axis_num=n)  # fmt: skip
        frags = self.ag_size * self.stride

        def build(key, data, replica_id, flattened_range):
            parts = torch.chunk(data, self.stride, dim=0)
            return [ShardedTensor.from_rank_offsets(key, part, *offsets, (n, self.a + i * self.ag_size, frags), *col_axes,
                                                    replica_id=replica_id, prepend_axis_num=n)
                    for i, part in enumerate(parts)]  # fmt: skip

        def merge(parts):
            with torch.no_grad():
                return torch.cat(parts)

        return ShardedTensorFactory(key, tensor, build, merge, replica_id)


class Norm2D(RMSNorm2D):
    """megatron-style RMSNorm (``weight`` [H/tp_y], block y of the full [H]) over the residual layout
    [S/tp_x, B, H/tp_y]: statistics over the y group, weight gradients summed over the x group."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float, tp2d: TP2DSettings) -> None:
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError("Norm2D: TP-2D layers implement RMSNorm without layernorm_zero_centered_gamma only")
        g = tp2d.groups
        super().__init__(hidden_size, g.y_group, eps, grad_reduce_group=g.x_group, device=param_device(config),
                         dtype=config.params_dtype)  # fmt: skip
        self.y, self.tp_y, self.x = g.y, g.tp_y, g.x
        counted(self.weight, self.x == 0)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        n = len(sharded_offsets)
        key = f"{prefix}weight"
        return {key: ShardedTensor.from_rank_offsets(key, self.weight, *sharded_offsets, (n, self.y, self.tp_y),
                                                     replica_id=(0, self.x, dp_rank()), prepend_axis_num=n)}  # fmt: skip


def check_grid_model(spec: ModelSpec, feature: str, flag: str, tp: int, split: int, split_name: str,
                     context_parallel: bool = False) -> None:  # fmt: skip
    """Refuse models the grid layers of ``feature`` (e.g. "TP-2D", enabled by ``flag`` "--tp-2d") do
    not cover: ``tp`` must be megatron's TP size, heads / query groups / ffn divide by ``split`` (the
    ``split_name`` axis the heads are split over) and the hidden size by ``tp``. ``context_parallel``:
    whether the layers take a sequence split over context-parallel ranks."""
    c = spec.config
    if c.tensor_model_parallel_size != tp:
        raise ValueError(f"{feature}: the grid's {tp} ranks must equal tensor_model_parallel_size {c.tensor_model_parallel_size}")
    refused = {"MoE layers": bool(c.num_moe_experts), "multi-latent attention": bool(c.multi_latent_attention),
               "multi-token prediction": bool(c.mtp_num_layers), "sequence parallelism": c.sequence_parallel,
               "context parallelism": c.context_parallel_size > 1 and not context_parallel,
               "a non-SwiGLU MLP": not c.gated_linear_unit,
               "an attention output gate": bool(getattr(c, "attention_output_gate", False)),
               "interleaved rotary embeddings": c.rotary_interleaved}  # fmt: skip
    for what, present in refused.items():
        if present:
            raise ValueError(f"{feature} with {what} is not implemented; drop {flag} or that feature")
    for name, count in (("num_attention_heads", c.num_attention_heads), ("num_query_groups", c.num_query_groups),
                        ("ffn_hidden_size", c.ffn_hidden_size)):  # fmt: skip
        if count % split:
            raise ValueError(f"{feature}: {name}={count} must divide by {split_name}={split}; choose another {split_name}")
    if c.hidden_size % tp:
        raise ValueError(f"{feature}: hidden_size={c.hidden_size} must divide by the {tp} ranks of the grid")


def grid_layer_specs(spec: ModelSpec, layer: type, grid) -> ModelSpec:
    """``spec`` with every decoder layer a ``layer`` (a GridTransformerLayer) over ``grid``, keeping
    each plain layer's q/k-norm choice and checkpoint key renames."""
    layers = []
    for plain in spec.layer_specs:
        attention = plain.submodules.self_attention.submodules
        qk_norm = attention.q_layernorm not in (None, IdentityOp)
        keys_map = dict(plain.submodules.sharded_state_dict_keys_map)
        layers.append(ModuleSpec(module=layer, params={"grid": grid, "qk_norm": qk_norm, "keys_map": keys_map}))
    return dataclasses.replace(spec, layer_specs=tuple(layers))


def enable_tp2d(spec: ModelSpec, settings: TP2DSettings) -> ModelSpec:
    """``spec`` with every decoder layer a :class:`~mindspeed_models.tp2d_layer.TP2DTransformerLayer`
    over ``settings``' grid (same parameter names and checkpoint keys). ``spec.config`` must have
    ``tensor_model_parallel_size = tp_x * tp_y``. Raises ValueError for models TP-2D does not cover."""
    from mindspeed_models.tp2d_layer import TP2DTransformerLayer

    check_tp2d_model(spec, settings.groups.tp_x, settings.groups.tp_y)
    return grid_layer_specs(spec, TP2DTransformerLayer, settings)


def check_tp2d_model(spec: ModelSpec, tp_x: int, tp_y: int) -> None:
    """Raise ValueError (one line) when the TP-2D layers do not cover ``spec`` on a ``tp_x x tp_y``
    grid (no process groups needed: launchers call it before starting any)."""
    check_grid_model(spec, "TP-2D", "--tp-2d", tp_x * tp_y, tp_x, "tp_x")
