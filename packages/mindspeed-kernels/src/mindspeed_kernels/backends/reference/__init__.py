"""The ``reference`` backend: pure torch, runs on every device, the ground truth for the others.

One exception to "pure torch written here": on CPU, ``flash_attention`` calls that torch's fused
CPU flash kernel computes exactly (float32/bfloat16/float16, no dropout, and a mask its
``is_causal`` flag expresses: none, or causal with Sq == Skv; not TND, no ALiBi) run that kernel,
with its log-sum-exp, 1.7-4x faster than the blockwise code (more for longer sequences); every
other call, float64 included, runs the blockwise implementation (see ``reference/attention.py``).
Likewise ``linear`` runs CPU float32 GEMMs through torch's oneDNN op (see ``reference/gemm.py``).
"""

from __future__ import annotations

from mindspeed_kernels.backends.reference.activation import geglu, swiglu
from mindspeed_kernels.backends.reference.attention import flash_attention
from mindspeed_kernels.backends.reference.cross_entropy import fused_linear_cross_entropy
from mindspeed_kernels.backends.reference.gemm import linear
from mindspeed_kernels.backends.reference.grouped_matmul import grouped_matmul
from mindspeed_kernels.backends.reference.moe import moe_token_permute, moe_token_unpermute
from mindspeed_kernels.backends.reference.norm import rms_norm
from mindspeed_kernels.backends.reference.ring import ring_attention_update
from mindspeed_kernels.backends.reference.rotary import rotary_pos_emb


def available() -> str | None:
    return None


OPS = {
    "rms_norm": rms_norm,
    "swiglu": swiglu,
    "geglu": geglu,
    "rotary_pos_emb": rotary_pos_emb,
    "flash_attention": flash_attention,
    "ring_attention_update": ring_attention_update,
    "moe_token_permute": moe_token_permute,
    "moe_token_unpermute": moe_token_unpermute,
    "grouped_matmul": grouped_matmul,
    "fused_linear_cross_entropy": fused_linear_cross_entropy,
    "linear": linear,
}
