"""torch's own fused attention kernels with their log-sum-exp, shared by the backends that use
them where a call fits (``reference`` on CPU, ``cuda``).

:data:`KERNELS` names each kernel; all are called on [B, N, S, D] views and give out
[B, Nq, Sq, Dv] in q's dtype and the natural-log lse [B, Nq, Sq]. Their autograd formulas
differentiate out but not the lse, so :func:`attention_with_lse` adds the lse gradient with
:class:`DifferentiableLse` (it costs nothing unless the lse is used in the loss).

:func:`mask_fits` is the part of every fit decision that is about the mask: the kernels' only
mask is ``is_causal``, so a call fits when that flag expresses its mask exactly: no
``atten_mask``, no ALiBi, not TND, non-empty sequences, and either mode 0 without a band (no
mask) or modes 2/3 with Sq == Skv (where top-left and bottom-right causal coincide; for
Sq != Skv the kernels' alignment is not the same on every device and torch release).
"""

from __future__ import annotations

import torch

from mindspeed_kernels._layouts import from_bnsd, to_bnsd
from mindspeed_kernels.backends._lse_grad import DifferentiableLse
from mindspeed_kernels.ops.attention import NO_LIMIT


def mask_fits(*, layout: str, sparse_mode: int, has_mask: bool, has_alibi: bool, pre_tokens: int, next_tokens: int,
              s_q: int, s_kv: int) -> bool:
    """Whether the kernels' ``is_causal`` flag (``sparse_mode != 0``) expresses this call's mask exactly."""
    if layout == "TND" or has_mask or has_alibi or min(s_q, s_kv) == 0:
        return False
    if sparse_mode == 0:
        return pre_tokens == NO_LIMIT and next_tokens == NO_LIMIT
    return sparse_mode in (2, 3) and s_q == s_kv


def _flash_cuda(q, k, v, dropout_p: float, causal: bool, scale: float):
    # FlashAttention-2 (float16/bfloat16, CUDA); takes GQA (Nkv dividing Nq) as is
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, causal, False, scale=scale)[:2]


def _flash_cpu(q, k, v, dropout_p: float, causal: bool, scale: float):
    # torch's blockwise CPU kernel; takes GQA as is, no dropout, equal q/k/v head dims
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, causal, scale=scale)


# looked up once, here, so that the CPU tests can stand in a fake for the CUDA-only op
EFFICIENT_OP = torch.ops.aten._scaled_dot_product_efficient_attention


def _efficient_cuda(q, k, v, dropout_p: float, causal: bool, scale: float):
    # the memory-efficient kernel (float32 included) needs one head count for q, k and v: kv head
    # h // groups serves query head h, which repeat_interleave lays out; autograd sums the copies' gradients
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return EFFICIENT_OP(q, k, v, None, True, dropout_p, causal, scale=scale)[:2]


KERNELS = {"flash": _flash_cuda, "flash_cpu": _flash_cpu, "efficient": _efficient_cuda}


def run_kernel(kernel: str, q, k, v, dropout_p: float, causal: bool, scale: float):
    """(out [B, Nq, Sq, Dv], lse [B, Nq, Sq] float32) from ``KERNELS[kernel]`` on [B, N, S, D] tensors."""
    # the aten ops do not check that the last dim is contiguous (F.scaled_dot_product_attention's
    # dispatcher does), and torch 2.13's CPU kernel silently returns wrong values when it is not
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out, lse = KERNELS[kernel](q, k, v, dropout_p, causal, scale)
    return out, lse[..., : q.shape[2]].float()  # the efficient kernel pads lse's sequence axis (to a multiple of 32)


def attention_with_lse(kernel: str, q, k, v, layout: str, n_q: int, causal: bool, scale: float, dropout_p: float):
    """The kernel on layout tensors (not TND): (out in q's layout, lse [B, Nq, Sq] float32), both differentiable."""
    n_kv = k.shape[-1] // (q.shape[-1] // n_q) if layout in ("SBH", "BSH") else None
    q4, k4, v4 = to_bnsd(q, layout, n_q), to_bnsd(k, layout, n_kv), to_bnsd(v, layout, n_kv)
    out, lse = run_kernel(kernel, q4, k4, v4, dropout_p, causal, scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        rerun = lambda q_, k_, value: run_kernel(kernel, q_, k_, value, 0.0, causal, scale)[0]  # noqa: E731
        lse = DifferentiableLse.apply(q4, k4, lse, rerun, "BNSD", n_q, scale)
    return from_bnsd(out, layout), lse


def call_dims(q, k, v, layout: str, num_heads: int | None) -> dict:
    """Nq, D, Dv, Sq and Skv of validated inputs (TND: Sq, Skv are the totals T), for the fit predicates."""
    n_q = num_heads if layout in ("SBH", "BSH") else q.shape[2 if layout == "BSND" else 1]
    d_qk = q.shape[-1] // n_q if layout in ("SBH", "BSH") else q.shape[-1]
    d_v = v.shape[-1] * d_qk // k.shape[-1] if layout in ("SBH", "BSH") else v.shape[-1]
    s_axis = {"SBH": 0, "BSH": 1, "BSND": 1, "BNSD": 2, "TND": 0}[layout]
    return dict(n_q=n_q, d_qk=d_qk, d_v=d_v, s_q=q.shape[s_axis], s_kv=k.shape[s_axis])
