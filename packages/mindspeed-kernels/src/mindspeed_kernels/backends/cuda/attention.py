"""flash_attention on CUDA: torch's FlashAttention-2 kernel
(``aten::_scaled_dot_product_flash_attention``, which returns the log-sum-exp) when the call
fits it, else the reference implementation.

:func:`flash_fits` is the whole decision: a CUDA device of compute capability >= 8.0, float16 or
bfloat16, a non-TND layout, no ``atten_mask`` and no ALiBi, equal q/k/v head dims that are a
multiple of 8 and at most 256, and a mask the kernel's ``is_causal`` flag expresses exactly:
mode 0 without a band (no mask), or modes 2/3 with Sq == Skv (where top-left and bottom-right
causal coincide; for Sq != Skv the two alignments differ and the kernel's is ambiguous between
torch releases). GQA is passed through unexpanded (the kernel takes Nkv dividing Nq).

The tensors are viewed as [B, N, S, D] (no copies for BNSD/BSND; SBH/BSH are split into heads).
Dropout uses the kernel's Philox stream from the CUDA default generator, replayed in backward.
out's gradient comes from torch's autograd formula for the kernel; the kernel's logsumexp has
none, so the lse gradient is added here (``dq += scale * g * (P k)``, ``dk += scale * P^T (g q)``,
from one more kernel call with ``value = k``), only when lse is used in the loss.
"""

from __future__ import annotations

import torch

from mindspeed_kernels._layouts import from_bnsd, to_bnsd
from mindspeed_kernels.backends._lse_grad import DifferentiableLse
from mindspeed_kernels.ops.attention import NO_LIMIT

FLASH_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def flash_fits(*, device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype, layout: str,
               sparse_mode: int, has_mask: bool, has_alibi: bool, pre_tokens: int, next_tokens: int,
               s_q: int, s_kv: int, d_qk: int, d_v: int) -> bool:
    """Whether torch's flash kernel computes exactly this call (see the module docstring)."""
    if device_type != "cuda" or capability is None or capability < (8, 0) or dtype not in FLASH_DTYPES:
        return False
    if layout == "TND" or has_mask or has_alibi or min(s_q, s_kv) == 0:
        return False
    if d_qk != d_v or d_qk % 8 or d_qk > MAX_HEAD_DIM:
        return False
    if sparse_mode == 0:
        return pre_tokens == NO_LIMIT and next_tokens == NO_LIMIT
    return sparse_mode in (2, 3) and s_q == s_kv


def _kernel(q, k, v, dropout_p: float, causal: bool, scale: float):
    """(out [B, N, Sq, Dv], lse [B, N, Sq] float32) from torch's flash kernel for q's device
    (the CPU variant serves the CPU tests of this module)."""
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, causal, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, causal, scale=scale)
    return out, lse[..., : q.shape[2]].float()


def flash_with_lse(q, k, v, layout: str, n_q: int, causal: bool, scale: float, dropout_p: float):
    """The kernel on layout tensors: (out in q's layout, lse [B, Nq, Sq] float32), differentiable."""
    n_kv = k.shape[-1] // (q.shape[-1] // n_q) if layout in ("SBH", "BSH") else None
    q4, k4, v4 = to_bnsd(q, layout, n_q), to_bnsd(k, layout, n_kv), to_bnsd(v, layout, n_kv)
    out, lse = _kernel(q4, k4, v4, dropout_p, causal, scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        rerun = lambda q_, k_, value: _kernel(q_, k_, value, 0.0, causal, scale)[0]  # noqa: E731
        lse = DifferentiableLse.apply(q4, k4, lse, rerun, "BNSD", n_q, scale)
    return from_bnsd(out, layout), lse


def _fits(q, k, v, layout, sparse_mode, pre_tokens, next_tokens, atten_mask, alibi_slopes, num_heads):
    n_q = num_heads if layout in ("SBH", "BSH") else q.shape[2 if layout == "BSND" else 1]
    d_qk = q.shape[-1] // n_q if layout in ("SBH", "BSH") else q.shape[-1]
    d_v = v.shape[-1] * d_qk // k.shape[-1] if layout in ("SBH", "BSH") else v.shape[-1]
    s_axis = {"SBH": 0, "BSH": 1, "BSND": 1, "BNSD": 2, "TND": 0}[layout]
    on_cuda = q.device.type == "cuda"
    fits = flash_fits(
        device_type=q.device.type, capability=torch.cuda.get_device_capability(q.device) if on_cuda else None,
        dtype=q.dtype, layout=layout, sparse_mode=sparse_mode, has_mask=atten_mask is not None,
        has_alibi=alibi_slopes is not None, pre_tokens=pre_tokens, next_tokens=next_tokens,
        s_q=q.shape[s_axis], s_kv=k.shape[s_axis], d_qk=d_qk, d_v=d_v,
    )
    return fits, n_q, d_qk


def flash_attention(
    q, k, v, layout="BNSD", sparse_mode=0, pre_tokens=NO_LIMIT, next_tokens=NO_LIMIT, *, atten_mask=None,
    scale=None, dropout_p=0.0, actual_seq_qlen=None, actual_seq_kvlen=None, num_heads=None, alibi_slopes=None,
):
    """See :func:`mindspeed_kernels.ops.flash_attention` and this module's docstring."""
    fits, n_q, d_qk = _fits(q, k, v, layout, sparse_mode, pre_tokens, next_tokens, atten_mask, alibi_slopes, num_heads)
    if not fits:
        from mindspeed_kernels.backends import reference

        return reference.OPS["flash_attention"](
            q, k, v, layout, sparse_mode, pre_tokens, next_tokens, atten_mask=atten_mask, scale=scale,
            dropout_p=dropout_p, actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
            num_heads=num_heads, alibi_slopes=alibi_slopes,
        )
    scale = float(d_qk**-0.5 if scale is None else scale)
    return flash_with_lse(q, k, v, layout, n_q, sparse_mode != 0, scale, float(dropout_p))
