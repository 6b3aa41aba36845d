"""mindspeed_ckpt: Hugging Face <-> Megatron checkpoint conversion (torch, safetensors, numpy only).

- ``mindspeed_ckpt.maps``: HF <-> megatron-core GPTModel name maps and tensor transforms (pure data + torch).
- ``mindspeed_ckpt.convert``: ``hf_to_mcore`` / ``mcore_to_hf`` between HF safetensors directories and
  Megatron legacy checkpoints (TP/PP/VPP/EP, uneven PP), streaming, written atomically; ``mindspeed convert`` (``cli``).
- ``read_mcore(dir) -> McoreCheckpoint``: stream a legacy checkpoint as full (TP1 PP1 EP1) megatron tensors.
  Still to come (issue #5): torch_dist, ETP > 1, reshard, verify, LoRA merge.
"""

from mindspeed_ckpt._version import __version__
from mindspeed_ckpt.reader import McoreCheckpoint, read_mcore

__all__ = ["McoreCheckpoint", "__version__", "read_mcore"]
