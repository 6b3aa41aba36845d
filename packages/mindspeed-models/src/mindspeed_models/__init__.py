"""mindspeed_models: megatron-core models built from Hugging Face configs (land with issue #4)."""

from mindspeed_models._version import __version__

__all__ = ["__version__"]
