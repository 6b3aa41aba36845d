"""mindspeed_ckpt: Hugging Face <-> Megatron checkpoint conversion (torch, safetensors, numpy only).

- ``mindspeed_ckpt.maps``: HF <-> megatron-core GPTModel name maps and tensor transforms (pure data + torch).
- ``mindspeed_ckpt.convert``: ``hf_to_mcore`` / ``mcore_to_hf`` between HF safetensors directories and
  Megatron legacy checkpoints (TP/PP), streaming, written atomically; ``mindspeed convert`` (``cli``).
  Still to come (issue #5): torch_dist, EP/VPP, MoE/MLA layouts, reshard, verify, LoRA merge.
"""

from mindspeed_ckpt._version import __version__

__all__ = ["__version__"]
