"""The ``npu`` backend: each op mapped onto torch_npu's documented fused kernel.

UNTESTED ON HARDWARE. The mapping is checked on CPU against a fake ``torch_npu``
(``tests/backends/fake_torch_npu.py``) whose functions carry the documented parameter names and
defaults, enforce the documented shape/dtype/layout constraints and compute the documented
formula; what the real kernels do beyond their documentation is an assumption, listed in each
module's docstring (e.g. the precision kernels compute in, their handling of fully masked rows).

torch_npu is imported lazily inside each function, so importing this package never needs it.
Where a kernel cannot express a call (an unsupported dtype such as float64, a layout or
argument combination its documentation excludes), the op runs the ``reference``
implementation instead (plain torch, which runs on NPU too); each module says when.

=============================  =====================================================
op                             torch_npu kernel
=============================  =====================================================
rms_norm                       ``npu_rms_norm``
swiglu / geglu                 ``npu_swiglu`` / ``npu_geglu(activate_left=True)``
rotary_pos_emb                 ``npu_rotary_mul`` (4-d views, rotated slice only)
flash_attention                ``npu_fusion_attention`` (+ lse from softmax_max/sum)
ring_attention_update          ``npu_ring_attention_update`` (SBH views, autograd here)
moe_token_permute / unpermute  ``npu_moe_token_permute`` / ``npu_moe_token_unpermute``
grouped_matmul                 ``npu_grouped_matmul`` (autograd here)
fused_linear_cross_entropy     none: the reference implementation (see below)
linear                         none: torch's GEMM (``torch.nn.functional.linear``, torch_npu's matmul)
=============================  =====================================================
"""

from __future__ import annotations

from mindspeed_kernels.backends import reference as _reference
from mindspeed_kernels.backends.npu.activation import geglu, swiglu
from mindspeed_kernels.backends.npu.attention import flash_attention
from mindspeed_kernels.backends.npu.grouped_matmul import grouped_matmul
from mindspeed_kernels.backends.npu.moe import moe_token_permute, moe_token_unpermute
from mindspeed_kernels.backends.npu.norm import rms_norm
from mindspeed_kernels.backends.npu.ring import ring_attention_update
from mindspeed_kernels.backends.npu.rotary import rotary_pos_emb


def available() -> str | None:
    """None when torch_npu imports, else the reason (one line)."""
    try:
        import torch_npu  # noqa: F401  (importing it registers the npu device with torch)
    except ImportError as exc:
        return f"torch_npu is not importable ({exc})"
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
    # torch_npu has no fused linear + cross-entropy kernel; the reference implementation is
    # chunked matmuls and elementwise torch ops, which already run as NPU kernels.
    "fused_linear_cross_entropy": _reference.OPS["fused_linear_cross_entropy"],
    # torch_npu runs F.linear as its matmul kernel; the reference op is that call off CPU.
    "linear": _reference.OPS["linear"],
}
