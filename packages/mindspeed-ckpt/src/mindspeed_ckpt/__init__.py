"""mindspeed_ckpt: Hugging Face <-> Megatron checkpoint conversion (lands with issue #5)."""

from mindspeed_ckpt._version import __version__

__all__ = ["__version__"]
