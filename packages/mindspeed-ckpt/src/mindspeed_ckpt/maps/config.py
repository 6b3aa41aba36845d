"""Reading the fields of an HF ``config.json`` that decide tensor names and shapes.

Only structural fields are read. A missing required field is an error naming it; optional
ones fall back to the default the HF model class uses when the key is absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_MISSING = object()


def model_type(hf_config: Any) -> str:
    """The ``model_type`` of a config dict (the parsed ``config.json``)."""
    if not isinstance(hf_config, Mapping):
        raise TypeError(
            f"hf_config must be a dict (the parsed config.json); got {type(hf_config).__name__} "
            "(for a transformers config object pass config.to_dict())"
        )
    mt = hf_config.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise ValueError("hf_config has no 'model_type'; pass the contents of the model's config.json")
    return mt


def get(cfg: Mapping[str, Any], keys: str | tuple[str, ...], default: Any = _MISSING) -> Any:
    """The first present, non-null key of ``keys``; ``default`` if none (an error if no default)."""
    names = (keys,) if isinstance(keys, str) else keys
    for k in names:
        if cfg.get(k) is not None:
            return cfg[k]
    if default is _MISSING:
        spelled = " or ".join(repr(k) for k in names)
        raise ValueError(f"hf_config (model_type {cfg.get('model_type')!r}) lacks {spelled}; pass the model's full config.json")
    return default


def count(cfg: Mapping[str, Any], keys: str | tuple[str, ...], default: Any = _MISSING, *, minimum: int = 1) -> int:
    """An integer field that must be >= ``minimum``."""
    v = get(cfg, keys, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        name = keys if isinstance(keys, str) else keys[0]
        raise ValueError(f"hf_config[{name!r}] must be an integer >= {minimum}; got {v!r}")
    return v


def flag(cfg: Mapping[str, Any], key: str, default: bool = False) -> bool:
    v = cfg.get(key)
    return default if v is None else bool(v)


def base_dims(cfg: Mapping[str, Any]) -> tuple[dict[str, int], set[str]]:
    """Dims and features every decoder-only GPT shares: vocabulary, hidden, heads, dense MLP."""
    hidden = count(cfg, "hidden_size")
    heads = count(cfg, "num_attention_heads")
    groups = count(cfg, "num_key_value_heads", heads)
    if heads % groups:
        raise ValueError(f"hf_config: num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"hf_config: hidden_size={hidden} is not a multiple of num_attention_heads={heads}; set head_dim")
        head_dim = hidden // heads
    head_dim = count({"head_dim": head_dim}, "head_dim")
    dims = {
        "vocab": count(cfg, "vocab_size"),
        "hidden": hidden,
        "heads": heads,
        "groups": groups,
        "head_dim": head_dim,
        "q": heads * head_dim,
        "kv": groups * head_dim,
        "ffn": count(cfg, "intermediate_size"),
        "one": 1,
    }
    features = {"tied" if flag(cfg, "tie_word_embeddings") else "untied"}
    return dims, features


def reject(cfg: Mapping[str, Any], *keys: str) -> None:
    """Refuse boolean options the map has no tensors for."""
    for k in keys:
        if flag(cfg, k):
            raise ValueError(
                f"hf_config[{k!r}] = true is not supported for model_type {cfg.get('model_type')!r} by the mindspeed_ckpt maps"
            )
