"""The explicit table of supported HF ``model_type``s."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from mindspeed_ckpt.maps.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from mindspeed_ckpt.maps.dense import LLAMA, QWEN2, QWEN3
from mindspeed_ckpt.maps.moe import MIXTRAL, QWEN2_MOE, QWEN3_MOE
from mindspeed_ckpt.maps.spec import Architecture

ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {a.model_type: a for a in (LLAMA, QWEN2, QWEN3, MIXTRAL, QWEN2_MOE, QWEN3_MOE, DEEPSEEK_V2, DEEPSEEK_V3)}
)


def architecture(model_type: str) -> Architecture:
    """The map for ``model_type``; ValueError naming it and the supported ones otherwise."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"model_type {model_type!r} is not supported by mindspeed_ckpt.maps; supported: {supported}") from None
