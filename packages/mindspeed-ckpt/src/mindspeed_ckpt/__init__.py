"""mindspeed_ckpt: Hugging Face <-> Megatron checkpoint conversion (torch, safetensors, numpy only).

- ``mindspeed_ckpt.maps``: HF <-> megatron-core GPTModel name maps and tensor transforms (pure data + torch).
- ``mindspeed_ckpt.convert``: ``hf_to_mcore`` / ``mcore_to_hf`` between HF safetensors directories and
  Megatron legacy checkpoints (TP/PP/VPP/EP, uneven PP), streaming, written atomically; ``mindspeed convert`` (``cli``).
- ``read_mcore(dir) -> McoreCheckpoint``: stream a legacy checkpoint as full (TP1 PP1 EP1) megatron tensors.
- ``mindspeed_ckpt.torch_dist``: ``--format torch_dist`` via megatron-core's dist_checkpointing (needs mindspeed-models).
- ``mindspeed_ckpt.verify``: ``mindspeed convert verify``, transformers vs megatron-core logits (needs both, lazily).
- ``mindspeed_ckpt.reshard``: ``mindspeed convert reshard``, legacy -> legacy in any other TP/PP/VPP/EP layout, streaming.
- ``mindspeed_ckpt.lora``: LoRA adapters (HF PEFT or Megatron layout) merged into the base on ``mcore-to-hf``.
  Still to come (issue #5): ETP > 1.
"""

from typing import Any

from mindspeed_ckpt._version import __version__

__all__ = ["McoreCheckpoint", "__version__", "read_mcore"]


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): importing the package must not import torch (the CLI's fast path runs without it).
    if name in ("McoreCheckpoint", "read_mcore"):
        from mindspeed_ckpt import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'mindspeed_ckpt' has no attribute {name!r}")
