"""Hugging Face <-> megatron-core GPTModel name maps and tensor transforms (pure data + torch).

Names on the megatron side are those of megatron-core's local (non-Transformer-Engine) GPT
layer spec at TP=1, PP=1, EP=1; on the HF side, the tensor names of a Hub checkpoint
(``model.safetensors``: per-expert MoE weights, DeepSeek MTP layers as extra layers).

Each architecture is a table of patterns (``spec.Pattern``) expanded per config into
:class:`Rule`s; one rule makes one megatron tensor from one or more HF tensors and back, so a
streaming converter can work tensor by tensor::

    for rule in rules(hf_config, padded_vocab_size=V):
        name, tensor = apply_hf_to_mcore(rule, reader.get_tensor)   # lazily pulls HF tensors

:func:`hf_to_mcore` and :func:`mcore_to_hf` are the whole-dict loops over the same rules.
"""

from mindspeed_ckpt.maps.convert import (
    apply_hf_to_mcore,
    apply_mcore_to_hf,
    hf_to_mcore,
    ignored_hf,
    layout,
    mcore_to_hf,
    rules,
)
from mindspeed_ckpt.maps.registry import ARCHITECTURES, architecture
from mindspeed_ckpt.maps.spec import Architecture, Layout, Pattern, Rule
from mindspeed_ckpt.maps.transforms import (
    TRANSFORMS,
    Transform,
    concat_gate_up,
    interleave_qkv,
    pad_vocab,
    split_gate_up,
    split_qkv,
    unpad_vocab,
)

__all__ = [
    "ARCHITECTURES",
    "TRANSFORMS",
    "Architecture",
    "Layout",
    "Pattern",
    "Rule",
    "Transform",
    "apply_hf_to_mcore",
    "apply_mcore_to_hf",
    "architecture",
    "concat_gate_up",
    "hf_to_mcore",
    "ignored_hf",
    "interleave_qkv",
    "layout",
    "mcore_to_hf",
    "pad_vocab",
    "rules",
    "split_gate_up",
    "split_qkv",
    "unpad_vocab",
]
