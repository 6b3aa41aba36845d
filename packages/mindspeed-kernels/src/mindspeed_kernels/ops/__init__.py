"""Functional fused ops, one signature each, with autograd; the backend is picked per call.

See :mod:`mindspeed_kernels.registry` for backend selection and docs/kernels.md for the
reference of every op.
"""

from mindspeed_kernels.ops.activation import geglu, swiglu
from mindspeed_kernels.ops.attention import flash_attention, ring_attention_update
from mindspeed_kernels.ops.cross_entropy import fused_linear_cross_entropy
from mindspeed_kernels.ops.grouped_matmul import grouped_matmul
from mindspeed_kernels.ops.linear import linear
from mindspeed_kernels.ops.moe import moe_token_permute, moe_token_unpermute
from mindspeed_kernels.ops.norm import rms_norm
from mindspeed_kernels.ops.rotary import rotary_pos_emb

__all__ = [
    "flash_attention",
    "fused_linear_cross_entropy",
    "geglu",
    "grouped_matmul",
    "linear",
    "moe_token_permute",
    "moe_token_unpermute",
    "ring_attention_update",
    "rms_norm",
    "rotary_pos_emb",
    "swiglu",
]
