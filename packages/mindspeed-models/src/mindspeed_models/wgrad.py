"""Weight gradients under megatron's ``gradient_accumulation_fusion``, for linears written here.

megatron's linear backward adds ``g^T @ x`` straight into ``weight.main_grad`` (the DDP buffer)
through apex's ``fused_weight_gradient_mlp_cuda`` (the adaptor's stand-in off CUDA) and hands
autograd a placeholder gradient, flagging ``grad_added_to_main_grad`` so the DDP hook does not add
it again. :class:`mindspeed_models.mlp.SwiGLUMLP`'s fc1 and the CPU linear of the adaptor follow
the same contract through :func:`accumulate_weight_grad`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core.tensor_parallel import layers as megatron_layers


def wgrad_accumulator(main_grad: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """The kernel megatron calls for ``main_grad``'s dtype: ``f(x [T, K], g [T, N], main_grad [N, K])``
    adds ``g^T @ x`` into ``main_grad``. Looked up per call: apex's, or the adaptor's stand-in."""
    kernels = megatron_layers.fused_weight_gradient_mlp_cuda
    if main_grad.dtype == torch.float32:
        return kernels.wgrad_gemm_accum_fp32
    if main_grad.dtype in (torch.float16, torch.bfloat16):
        return kernels.wgrad_gemm_accum_fp16
    raise RuntimeError(f"gradient accumulation fusion does not support main_grad dtype {main_grad.dtype}")


def accumulate_weight_grad(weight: torch.Tensor, main_grad: torch.Tensor, x2: torch.Tensor,
                           grad_blocks: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """Add ``g^T @ x2`` of each block of ``grad_blocks`` ([T, rows_i], in order) into consecutive row
    blocks of ``main_grad`` (re-bound on ``weight`` first, as megatron's backward does); return what
    megatron's linear returns as the weight's gradient (:func:`main_grad_placeholder`). x2: [T, K]."""
    weight.main_grad = main_grad
    accumulate, start = wgrad_accumulator(main_grad), 0
    for g in grad_blocks:
        accumulate(x2, g, main_grad[start : start + g.shape[-1]])
        start += g.shape[-1]
    return main_grad_placeholder(weight, x2)


def main_grad_placeholder(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """What megatron's linear returns as the weight's gradient once it is in ``main_grad``: None without
    megatron's DDP (no ``grad_added_to_main_grad`` attribute), else a placeholder of ``like``'s dtype
    (zeros when ``zero_out_wgrad``) for the DDP hooks, which fire on the parameter's grad accumulator."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    fill = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    weight.grad_added_to_main_grad = True
    return fill(weight.main_grad.shape, dtype=like.dtype, device=like.device)
