"""mindspeed_models: megatron-core GPT models built from Hugging Face configs, with mindspeed_kernels inside.

Public API (imported on first use: ``import mindspeed_models`` alone does not load megatron-core):

- :func:`from_hf_config` (config.json -> :class:`ModelSpec`), :func:`build_model`
  (ModelSpec -> megatron ``GPTModel``), :func:`logits` (model, input_ids -> [B, S, V] float32);
- :func:`load_pretrained` (HF directory -> :class:`PretrainedModel` with ``.logits``);
- :data:`ARCHITECTURES` (model_type -> :class:`Architecture`, the HF key tables);
- :func:`ensure_parallel_state` (world-size-1 process group + megatron parallel state).
"""

from __future__ import annotations

import importlib

from mindspeed_models._version import __version__

_EXPORTS = {
    "ARCHITECTURES": "mindspeed_models.architectures",
    "Architecture": "mindspeed_models.architectures",
    "HFKey": "mindspeed_models.architectures",
    "ModelSpec": "mindspeed_models.config",
    "RopeSettings": "mindspeed_models.config",
    "from_hf_config": "mindspeed_models.config",
    "build_model": "mindspeed_models.model",
    "logits": "mindspeed_models.model",
    "PretrainedModel": "mindspeed_models.pretrained",
    "load_pretrained": "mindspeed_models.pretrained",
    "ensure_parallel_state": "mindspeed_models.runtime",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    # Lazy: megatron-core takes seconds to import; the CLI and docs tools only need the tables.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mindspeed_models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
