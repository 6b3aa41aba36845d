"""mindspeed_parallel: Parallel algorithms over caller-given process groups (land with issue #7)."""

from mindspeed_parallel._version import __version__

__all__ = ["__version__"]
