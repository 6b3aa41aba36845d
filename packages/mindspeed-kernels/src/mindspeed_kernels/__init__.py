"""mindspeed_kernels: fused ops (RMSNorm, SwiGLU/GEGLU, RoPE, flash attention, ring merge, MoE
permute, grouped matmul, fused linear cross-entropy) with reference/npu/cuda backends.

Depends on torch only. ``mindspeed_kernels.ops`` holds the functional ops,
``mindspeed_kernels.rope`` the frequency builders, ``mindspeed_kernels.modules`` layer wrappers,
``mindspeed_kernels.accelerator`` the hardware queries, ``mindspeed_kernels.registry`` backend selection.
"""

from mindspeed_kernels import accelerator, ops, registry
from mindspeed_kernels._version import __version__

__all__ = ["__version__", "accelerator", "ops", "registry"]
