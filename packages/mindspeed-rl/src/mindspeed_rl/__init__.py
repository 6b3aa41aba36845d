"""mindspeed_rl: Preference/RL losses and trainers (land after the training loop)."""

from mindspeed_rl._version import __version__

__all__ = ["__version__"]
