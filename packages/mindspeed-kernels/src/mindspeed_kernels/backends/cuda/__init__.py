"""The ``cuda`` backend: torch's own fast CUDA paths where they fit, the reference elsewhere.

=============================  ==========================================================
op                             implementation
=============================  ==========================================================
rms_norm                       ``torch.nn.functional.rms_norm`` (float32 upcast by default)
flash_attention                torch's fused kernels with their log-sum-exp when the call
                               fits: FlashAttention-2 for float16/bfloat16
                               (:func:`.attention.flash_fits`), the memory-efficient kernel
                               for float32 (:func:`.attention.efficient_fits`); else reference
grouped_matmul                 ``torch.nn.functional.grouped_mm`` when the call fits
                               (:func:`.grouped_mm.grouped_mm_fits`), else reference
everything else                the reference implementation: elementwise ops, gathers and
                               chunked matmuls that torch eager already runs as CUDA kernels
                               (``linear``: torch's GEMM, cuBLAS)
=============================  ==========================================================

No Triton kernels: Triton is not a dependency of this package and could not be tested here.
The numeric tests of the CUDA paths need a GPU and are skipped without one; the decision logic
(the ``*_fits`` predicates) and the CUDA code paths' layout/gradient plumbing are tested on CPU.
"""

from __future__ import annotations

import torch

from mindspeed_kernels.backends import reference as _reference
from mindspeed_kernels.backends.cuda.attention import flash_attention
from mindspeed_kernels.backends.cuda.grouped_mm import grouped_matmul
from mindspeed_kernels.backends.cuda.norm import rms_norm


def available() -> str | None:
    """None when torch sees a CUDA device, else the reason (one line)."""
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no CUDA device, or a CPU-only torch build)"
    return None


_REF = _reference.OPS
OPS = {
    "rms_norm": rms_norm,
    "flash_attention": flash_attention,
    "grouped_matmul": grouped_matmul,
    # torch eager is already the fast path for these: elementwise ops (fused by nothing we ship),
    # index_select/index_add gathers, and chunked matmuls; the reference code is that eager code.
    "swiglu": _REF["swiglu"],
    "geglu": _REF["geglu"],
    "rotary_pos_emb": _REF["rotary_pos_emb"],
    "ring_attention_update": _REF["ring_attention_update"],
    "moe_token_permute": _REF["moe_token_permute"],
    "moe_token_unpermute": _REF["moe_token_unpermute"],
    "fused_linear_cross_entropy": _REF["fused_linear_cross_entropy"],
    "linear": _REF["linear"],  # torch.nn.functional.linear off CPU (cuBLAS)
}
