"""megatron's column/row-parallel linear on CPU, its GEMMs through :func:`mindspeed_kernels.ops.linear`.

megatron's ``LinearWithGradAccumulationAndAsyncCommunication`` computes ``x @ W^T`` and the input
gradient ``g @ W`` with ``torch.matmul``: MKL's sgemm for CPU float32. ``ops.linear`` runs those
through oneDNN's float32 GEMM (see ``mindspeed_kernels.backends.reference.gemm``), 10-20% faster
on the CPUs we measure; these two GEMMs per linear are a large part of a CPU training step.

The calls a CPU run makes take this path: float32, no sequence parallelism, no deferred weight
gradients (``grad_output_buffer``), no Megatron-FSDP parameter, no autocast. Anything else runs
megatron's function. The contract is megatron's: under ``gradient_accumulation_fusion`` the weight
gradient is added into ``weight.main_grad`` (megatron's kernel, megatron's placeholder gradient),
otherwise returned; with ``allreduce_dgrad`` the input gradient is all-reduced over the TP group
while the weight gradient is computed; the bias gradient is the sum over tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.utils import get_tensor_model_parallel_group_if_none
from torch.autograd.function import once_differentiable

from mindspeed_kernels.ops import linear
from mindspeed_models.wgrad import accumulate_weight_grad


class _KernelLinear(torch.autograd.Function):
    """``x @ W^T (+ b)`` for x [..., K], W [N, K]; backward as megatron's linear (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, tp_group):
        ctx.save_for_backward(x, weight)
        # As megatron: main_grad is held by ctx (not saved) and re-bound on the weight in backward.
        ctx.main_grad = weight.main_grad if gradient_accumulation_fusion and hasattr(weight, "main_grad") else None
        ctx.has_bias, ctx.allreduce_dgrad, ctx.tp_group = bias is not None, allreduce_dgrad, tp_group
        return linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = handle = None
        if ctx.needs_input_grad[0]:
            grad_x = linear(grad, weight.t())
            if ctx.allreduce_dgrad:
                handle = dist.all_reduce(grad_x, group=ctx.tp_group, async_op=True)
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = _weight_grad(ctx, weight, x2, g2) if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if handle is not None:
            handle.wait()
        return grad_x, grad_w, grad_b, None, None, None


def _weight_grad(ctx, weight: torch.Tensor, x2: torch.Tensor, g2: torch.Tensor) -> torch.Tensor | None:
    if ctx.main_grad is None:
        return torch.mm(g2.t(), x2)
    return accumulate_weight_grad(weight, ctx.main_grad, x2, (g2,))


def _kernel_path(input, weight, bias, sequence_parallel, grad_output_buffer, async_grad_allreduce) -> bool:
    if input.device.type != "cpu" or input.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    if sequence_parallel or grad_output_buffer is not None or async_grad_allreduce is not None:
        return False
    return not hasattr(weight, "__fsdp_param__") and not torch.is_autocast_enabled("cpu")


def kernel_linear_factory(original):
    """megatron's ``linear_with_grad_accumulation_and_async_allreduce`` (same signature) taking the
    kernels' GEMM for the calls the module docstring lists, megatron's function for the rest."""

    def linear_with_grad_accumulation_and_async_allreduce(
        input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
        grad_output_buffer=None, wgrad_deferral_limit=0, async_grad_allreduce=None, tp_group=None,
    ):  # fmt: skip
        if not _kernel_path(input, weight, bias, sequence_parallel, grad_output_buffer, async_grad_allreduce):
            return original(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                            grad_output_buffer, wgrad_deferral_limit, async_grad_allreduce, tp_group)  # fmt: skip
        group = get_tensor_model_parallel_group_if_none(tp_group) if allreduce_dgrad else None
        return _KernelLinear.apply(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, group)

    linear_with_grad_accumulation_and_async_allreduce.__wrapped__ = original
    # megatron's function reads and sets its one-time-warning flag through the module global, i.e. on this
    linear_with_grad_accumulation_and_async_allreduce.warned = getattr(original, "warned", False)
    return linear_with_grad_accumulation_and_async_allreduce
