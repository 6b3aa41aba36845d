"""flash_attention on CUDA: torch's fused attention kernels with their log-sum-exp (the code is
shared with the reference backend's CPU path: :mod:`mindspeed_kernels.backends._torch_sdpa`)
when the call fits one, else the reference implementation.

Two kernels, tried in this order; each ``*_fits`` predicate is the whole decision for its kernel:

- :func:`flash_fits`: FlashAttention-2 (``aten::_scaled_dot_product_flash_attention``) on a CUDA
  device of compute capability >= 8.0, float16 or bfloat16; GQA is passed through unexpanded
  (the kernel takes Nkv dividing Nq);
- :func:`efficient_fits`: the memory-efficient kernel
  (``aten::_scaled_dot_product_efficient_attention`` with ``compute_log_sumexp=True``) for
  float32, which the flash kernel does not take. It needs one head count for q, k and v, so GQA's
  K/V heads are repeated for it (a copy of K and V in memory).

Both need equal q/k/v head dims that are a multiple of 8 and at most 256, and a mask their
``is_causal`` flag expresses exactly (``_torch_sdpa.mask_fits``: no ``atten_mask``, no ALiBi,
not TND; mode 0 without a band, or modes 2/3 with Sq == Skv, where top-left and bottom-right
causal coincide).

The tensors are viewed as [B, N, S, D] (no copies for BNSD/BSND; SBH/BSH are split into heads).
Dropout uses the kernels' Philox stream from the CUDA default generator, replayed in backward.
out's gradient comes from torch's autograd formula for the kernel; the kernels' logsumexp has
none, so the lse gradient is added (``dq += scale * g * (P k)``, ``dk += scale * P^T (g q)``,
from one more kernel call with ``value = k``), only when lse is used in the loss.
"""

from __future__ import annotations

import torch

from mindspeed_kernels.backends._torch_sdpa import attention_with_lse, call_dims, mask_fits
from mindspeed_kernels.ops.attention import NO_LIMIT

FLASH_DTYPES = (torch.float16, torch.bfloat16)
EFFICIENT_DTYPES = (torch.float32,)
MAX_HEAD_DIM = 256


def _head_dims_fit(d_qk: int, d_v: int) -> bool:
    return d_qk == d_v and d_qk % 8 == 0 and d_qk <= MAX_HEAD_DIM


def flash_fits(*, device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype, layout: str,
               sparse_mode: int, has_mask: bool, has_alibi: bool, pre_tokens: int, next_tokens: int,
               s_q: int, s_kv: int, d_qk: int, d_v: int) -> bool:
    """Whether torch's flash kernel computes exactly this call (see the module docstring)."""
    if device_type != "cuda" or capability is None or capability < (8, 0) or dtype not in FLASH_DTYPES:
        return False
    return _head_dims_fit(d_qk, d_v) and mask_fits(
        layout=layout, sparse_mode=sparse_mode, has_mask=has_mask, has_alibi=has_alibi, pre_tokens=pre_tokens,
        next_tokens=next_tokens, s_q=s_q, s_kv=s_kv)


def efficient_fits(*, device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype, layout: str,
                   sparse_mode: int, has_mask: bool, has_alibi: bool, pre_tokens: int, next_tokens: int,
                   s_q: int, s_kv: int, d_qk: int, d_v: int) -> bool:
    """Whether torch's memory-efficient kernel computes exactly this float32 call (see the module docstring)."""
    # the kernel runs on every CUDA device torch builds for (compute capability >= 5.0)
    if device_type != "cuda" or capability is None or capability < (5, 0) or dtype not in EFFICIENT_DTYPES:
        return False
    return _head_dims_fit(d_qk, d_v) and mask_fits(
        layout=layout, sparse_mode=sparse_mode, has_mask=has_mask, has_alibi=has_alibi, pre_tokens=pre_tokens,
        next_tokens=next_tokens, s_q=s_q, s_kv=s_kv)


PATHS = (("flash", flash_fits), ("efficient", efficient_fits))  # (kernel in _torch_sdpa.KERNELS, predicate), in order


def flash_with_lse(q, k, v, layout: str, n_q: int, causal: bool, scale: float, dropout_p: float):
    """The flash kernel on layout tensors: (out in q's layout, lse [B, Nq, Sq] float32), differentiable
    (CPU tensors run torch's CPU flash kernel, which serves the CPU tests of this module)."""
    kernel = "flash" if q.device.type == "cuda" else "flash_cpu"
    return attention_with_lse(kernel, q, k, v, layout, n_q, causal, scale, dropout_p)


def choose_kernel(q, k, v, layout, sparse_mode, pre_tokens, next_tokens, atten_mask, alibi_slopes, num_heads):
    """(name of the first fitting kernel of :data:`PATHS` or None, the call's dims)."""
    dims = call_dims(q, k, v, layout, num_heads)
    on_cuda = q.device.type == "cuda"
    facts = dict(
        device_type=q.device.type, capability=torch.cuda.get_device_capability(q.device) if on_cuda else None,
        dtype=q.dtype, layout=layout, sparse_mode=sparse_mode, has_mask=atten_mask is not None,
        has_alibi=alibi_slopes is not None, pre_tokens=pre_tokens, next_tokens=next_tokens,
        s_q=dims["s_q"], s_kv=dims["s_kv"], d_qk=dims["d_qk"], d_v=dims["d_v"],
    )
    return next((name for name, fits in PATHS if fits(**facts)), None), dims


def flash_attention(
    q, k, v, layout="BNSD", sparse_mode=0, pre_tokens=NO_LIMIT, next_tokens=NO_LIMIT, *, atten_mask=None,
    scale=None, dropout_p=0.0, actual_seq_qlen=None, actual_seq_kvlen=None, num_heads=None, alibi_slopes=None,
):
    """See :func:`mindspeed_kernels.ops.flash_attention` and this module's docstring."""
    kernel, dims = choose_kernel(q, k, v, layout, sparse_mode, pre_tokens, next_tokens, atten_mask, alibi_slopes, num_heads)
    if kernel is None:
        from mindspeed_kernels.backends import reference

        return reference.OPS["flash_attention"](
            q, k, v, layout, sparse_mode, pre_tokens, next_tokens, atten_mask=atten_mask, scale=scale,
            dropout_p=dropout_p, actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
            num_heads=num_heads, alibi_slopes=alibi_slopes,
        )
    scale = float(dims["d_qk"] ** -0.5 if scale is None else scale)
    return attention_with_lse(kernel, q, k, v, layout, dims["n_q"], sparse_mode != 0, scale, float(dropout_p))
