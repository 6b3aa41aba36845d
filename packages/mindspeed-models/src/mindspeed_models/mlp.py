"""megatron-core's dense SwiGLU ``MLP`` with fc1's gate and up outputs laid out as two blocks.

megatron's ``linear_fc1`` computes ``[s, b, 2F]`` = ``[gate | up]`` in one GEMM; the activation then
reads and writes the two halves with a row stride of 2F. On CPU the elementwise kernels are
20-30% slower on such halves than on contiguous tensors, and ``silu_backward`` writing into a
strided half of the gradient up to 4x slower in a training step. :class:`SwiGLUMLP` writes
``x @ W[:F]^T`` and ``x @ W[F:]^T`` into the two contiguous blocks of one ``[2, s, b, F]`` buffer
(one GEMM each, same FLOPs) and runs the activation module along that leading axis, so every
elementwise pass is over contiguous memory; backward mirrors megatron's linear: input gradient
``g_gate @ W[:F] + g_up @ W[F:]``, weight gradient per half, accumulated straight into
``weight.main_grad`` under ``gradient_accumulation_fusion`` through the same kernel megatron calls
(apex's on CUDA, the adaptor's stand-in elsewhere). Parameters, state dicts and checkpoints are
megatron's MLP's; numbers equal megatron's to float rounding (the input gradient sums two GEMMs
instead of one).

Where the blocked path does not cover a feature, the forward is megatron's own, unchanged:
fc1 bias, sequence parallelism, fp8, activation offloading, autocast, per-token scales (experts),
a wrapped or hooked ``linear_fc1`` (DualPipe's deferred weight gradients, distributed-optimizer
parameter-gather hooks, adapters that replace the module).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.mlp import MLP
from torch.autograd.function import once_differentiable

from mindspeed_models.layers import SwiGLU
from mindspeed_models.wgrad import accumulate_weight_grad

__all__ = ["ActivationRecomputeMLP", "SwiGLUMLP", "blocked_linear"]


class _BlockedLinear(torch.autograd.Function):
    """``x @ W^T`` with W's two row halves written as two blocks: x [..., H], W [2F, H] -> [2, ..., F]."""

    @staticmethod
    def forward(ctx, x, weight, accumulate_in_main_grad: bool):
        rows = weight.shape[0] // 2
        x2 = x.reshape(-1, x.shape[-1])
        out = x2.new_empty(2, x2.shape[0], rows)
        torch.mm(x2, weight[:rows].t(), out=out[0])
        torch.mm(x2, weight[rows:].t(), out=out[1])
        ctx.save_for_backward(x2, weight)
        # As megatron's linear: main_grad is held by ctx (not saved), and re-bound in backward.
        ctx.main_grad = weight.main_grad if accumulate_in_main_grad and hasattr(weight, "main_grad") else None
        ctx.accumulate, ctx.in_shape = accumulate_in_main_grad, x.shape
        return out.view(2, *x.shape[:-1], rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        rows = weight.shape[0] // 2
        g = grad.reshape(2, -1, rows)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g[0], weight[:rows])
            grad_x.addmm_(g[1], weight[rows:])
            grad_x = grad_x.view(ctx.in_shape)
        grad_w = _weight_grad(ctx, g, x2, weight) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def _weight_grad(ctx, g: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """dW [2F, H] per half; under fusion accumulated into main_grad, returning what megatron's linear returns."""
    rows = g.shape[-1]
    if not ctx.accumulate:
        grad_w = torch.empty(weight.shape, dtype=x2.dtype, device=x2.device)
        torch.mm(g[0].t(), x2, out=grad_w[:rows])
        torch.mm(g[1].t(), x2, out=grad_w[rows:])
        return grad_w
    return accumulate_weight_grad(weight, ctx.main_grad, x2, (g[0], g[1]))


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, accumulate_in_main_grad: bool = False) -> torch.Tensor:
    """``x @ weight^T`` for a gated ``weight`` [2F, H] = [gate; up] rows: x [..., H] -> [2, ..., F]
    (block 0 the gate, block 1 the up projection), each block contiguous. Differentiable (once); with
    ``accumulate_in_main_grad`` the weight gradient is added to ``weight.main_grad`` as megatron's
    ``gradient_accumulation_fusion`` does."""
    if weight.dim() != 2 or weight.shape[0] % 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"blocked_linear: weight {tuple(weight.shape)} must be [2F, H] with H = x.shape[-1] ({x.shape[-1]})")
    return _BlockedLinear.apply(x, weight, accumulate_in_main_grad)


def _has_hooks(module: torch.nn.Module) -> bool:
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(module, name, None) for name in hooks)


class SwiGLUMLP(MLP):
    """megatron's ``MLP`` (same constructor, parameters, ``forward`` contract and checkpoints) whose
    ``linear_fc1`` output is computed as two contiguous [gate; up] blocks (module docstring).

    ``forward(hidden_states)``: [s, b, H] -> ([s, b, H], bias or None), as megatron's.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        fc1, cfg = self.linear_fc1, self.config
        self._blocked = (
            isinstance(self.activation_func, SwiGLU) and cfg.use_te_activation_func and fc1.bias is None
            and not (fc1.sequence_parallel or fc1.gather_output or fc1.explicit_expert_comm or fc1.disable_grad_reduce)
            and not (cfg.defer_embedding_wgrad_compute or cfg.fp8 or cfg.cpu_offloading)
        )  # fmt: skip

    def _blocked_path(self, hidden_states: torch.Tensor, per_token_scale) -> bool:
        fc1 = self.linear_fc1
        return (
            self._blocked and per_token_scale is None and type(fc1) is ColumnParallelLinear
            and "_forward_impl" not in fc1.__dict__ and not _has_hooks(fc1)
            and self.config._cpu_offloading_context is None
            and not torch.is_autocast_enabled(hidden_states.device.type)
        )  # fmt: skip

    def fc1_blocks(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """fc1 on [s, b, H] -> [2, s, b, F / tp] (gate block, up block) on the blocked path."""
        fc1 = self.linear_fc1
        if fc1.tp_group.size() > 1:  # megatron's column-parallel input: all-reduce of its gradient
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=fc1.tp_group)
        return blocked_linear(hidden_states, fc1.weight, fc1.gradient_accumulation_fusion)

    def activate_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """The activation module over [2, s, b, F] blocks -> [s, b, F]."""
        return self.activation_func(blocks, dim=0).squeeze(0)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self._blocked_path(hidden_states, per_token_scale):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        return self.linear_fc2(self.activate_blocks(self.fc1_blocks(hidden_states)))


class ActivationRecomputeMLP(SwiGLUMLP):
    """:class:`SwiGLUMLP` whose activation output is not kept for the backward pass (MindSpeed's
    ``recompute_activation_function``): ``linear_fc2`` saves its input, the ``[s, b, ffn/tp]``
    activation; here that tensor's storage is released right after fc2's forward and recomputed
    from fc1's output (which the activation's own backward keeps anyway) when fc2's backward needs
    it, with megatron's ``CheckpointWithoutOutput``. Same parameters, numbers and checkpoints as SwiGLUMLP.
    """

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is not None or not self.config.use_te_activation_func:
            raise ValueError("ActivationRecomputeMLP: only the SwiGLU activation module path is supported")
        from megatron.core.tensor_parallel import CheckpointWithoutOutput

        if self._blocked_path(hidden_states, per_token_scale):
            intermediate, activation = self.fc1_blocks(hidden_states), self.activate_blocks
        else:
            intermediate, bias = self.linear_fc1(hidden_states)
            if bias is not None:
                intermediate = intermediate + bias
            activation = self.activation_func
        checkpoint = CheckpointWithoutOutput()
        activated = checkpoint.checkpoint(activation, intermediate)
        output, output_bias = self.linear_fc2(activated)
        checkpoint.discard_output_and_register_recompute(output)
        return output, output_bias
