"""mindspeed_kernels: Fused ops with reference, npu and cuda backends (ops land with issue #3)."""

from mindspeed_kernels._version import __version__

__all__ = ["__version__"]
