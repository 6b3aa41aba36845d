"""mindspeed_train: Data pipeline and training loop (lands with issue #6)."""

from mindspeed_train._version import __version__

__all__ = ["__version__"]
