"""mindspeed_ckpt: Hugging Face <-> Megatron checkpoint conversion (lands with issue #5).

``mindspeed_ckpt.maps``: the HF <-> megatron-core GPTModel name maps and tensor transforms
(pure data + torch; import it explicitly, it is not imported here).
"""

from mindspeed_ckpt._version import __version__

__all__ = ["__version__"]
