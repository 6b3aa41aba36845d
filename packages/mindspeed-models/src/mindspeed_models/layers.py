"""Norm and activation modules with megatron-core's constructor interfaces, computed by mindspeed_kernels.

megatron builds norms as ``module(config=..., hidden_size=..., eps=...)`` and an MLP's
activation module as ``module(config=...)``; these classes accept exactly that and call
:func:`mindspeed_kernels.ops.rms_norm` / :func:`mindspeed_kernels.ops.swiglu`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from mindspeed_kernels import accelerator, modules, ops

__all__ = ["RMSNorm", "SwiGLU", "param_device"]


def param_device(config: TransformerConfig) -> torch.device:
    """Where megatron-core allocates parameters for ``config``: CPU under use_cpu_initialization."""
    return torch.device("cpu") if config.use_cpu_initialization else accelerator.current_device()


class RMSNorm(modules.RMSNorm):
    """megatron-compatible RMSNorm: ``RMSNorm(config, hidden_size, eps)``, parameter ``weight`` [hidden_size].

    ``forward(x)``: x [..., hidden_size] -> same shape and dtype, statistics in float32.
    ``config.layernorm_zero_centered_gamma`` stores ``weight - 1`` (scales by ``1 + weight``).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm: config.normalization={config.normalization!r}; this module implements 'RMSNorm' only")
        if config.persist_layer_norm or config.memory_efficient_layer_norm:
            raise ValueError("RMSNorm: persist_layer_norm / memory_efficient_layer_norm are apex options; set them False")
        super().__init__(
            hidden_size,
            eps,
            add_rmsnorm_offset=config.layernorm_zero_centered_gamma,
            device=param_device(config),
            dtype=config.params_dtype,
        )
        self.config = config
        # Under sequence parallelism each rank normalises its own tokens: the weight's gradient is
        # partial and megatron's DDP all-reduces parameters tagged like this across TP ranks.
        self.weight.sequence_parallel = config.sequence_parallel


class SwiGLU(torch.nn.Module):
    """MLP activation ``silu(gate) * up`` over fc1's output ``[..., 2F]`` = ``[gate | up]`` -> ``[..., F]``
    (``dim`` picks the axis holding the two halves: 0 for :class:`~mindspeed_models.mlp.SwiGLUMLP`'s
    ``[2, ..., F]`` blocks, which gives ``[1, ..., F]``)."""

    def __init__(self, config: TransformerConfig, **kwargs) -> None:
        super().__init__()
        if config.activation_func is not F.silu or not config.gated_linear_unit:
            raise ValueError("SwiGLU: needs activation_func=F.silu with gated_linear_unit=True")
        if config.activation_func_clamp_value is not None or config.glu_linear_offset != 0.0:
            raise ValueError("SwiGLU: activation_func_clamp_value / glu_linear_offset are not implemented; leave them unset")

    def forward(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return ops.swiglu(x, dim)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """No parameters: nothing to checkpoint (megatron's MLP asks each child for its sharded state)."""
        return {}
