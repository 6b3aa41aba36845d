"""From a Hugging Face ``config.json`` to a :class:`ModelSpec`: megatron TransformerConfig + layer specs.

Keys are read only through the tables of :mod:`mindspeed_models.architectures`; a key outside
them that could change the network gets a warning, a table key with an unsupported value an
error. RoPE follows ``transformers`` 5 resolution (``rope_parameters``, or the legacy
``rope_theta`` + ``rope_scaling``), with the frequency tables from :mod:`mindspeed_kernels.rope`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from mindspeed_kernels import accelerator
from mindspeed_kernels.rope import RopeScaling
from mindspeed_models import architectures, moe_config, moe_permute
from mindspeed_models._validate import finite_number, positive_int
from mindspeed_models.architectures import Architecture
from mindspeed_models.spec import layer_specs

__all__ = ["ModelSpec", "RopeSettings", "from_hf_config", "read_hf_config", "without_absent_mtp"]

_log = logging.getLogger(__name__)

SPEC_OVERRIDES = ("make_vocab_size_divisible_by",)
"""Overrides of :func:`from_hf_config` that are not TransformerConfig fields."""

_ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta", "partial_rotary_factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "truncate",
    },
}


class ReadOnlyDict(Mapping):
    """A read-only view of a dict that, unlike MappingProxyType, pickles and deep-copies."""

    def __init__(self, data: dict) -> None:
        self._data = dict(data)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"ReadOnlyDict({self._data!r})"


@dataclass(frozen=True)
class RopeSettings:
    """Rotary embedding of the model.

    ``dim`` rotary channels per head (= kv_channels), ``base`` theta, ``scaling`` the
    :class:`~mindspeed_kernels.rope.RopeScaling` for the inverse frequencies (None = plain),
    ``attention_factor`` HF's multiplier of cos/sin (YaRN; 1 otherwise; it is folded into the
    softmax scale as its square), ``rope_type`` HF's name.
    """

    dim: int
    base: float
    scaling: RopeScaling | None
    attention_factor: float
    rope_type: str


@dataclass(frozen=True)
class ModelSpec:
    """Everything :func:`mindspeed_models.build_model` needs, from one HF config.

    ``config`` megatron TransformerConfig; ``layer_specs`` one megatron ModuleSpec per global
    layer (pipeline stages take their slice); ``vocab_size`` the HF vocabulary,
    ``padded_vocab_size`` the embedding rows; ``max_position_embeddings`` GPTModel's
    max_sequence_length; ``rope`` the rotary settings; ``tie_word_embeddings`` whether the output
    layer reuses the embedding; ``architecture`` the HF model_type; ``hf_config`` the read-only
    config.json contents (what checkpoint name maps need).
    """

    architecture: str
    config: TransformerConfig
    layer_specs: tuple[ModuleSpec, ...]
    vocab_size: int
    padded_vocab_size: int
    max_position_embeddings: int
    rope: RopeSettings
    tie_word_embeddings: bool
    hf_config: Mapping[str, Any]


def read_hf_config(config: Mapping | str | os.PathLike) -> dict:
    """``config`` as a dict: a mapping, a ``config.json`` path, or a directory holding one."""
    if isinstance(config, Mapping):
        return dict(config)
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be a dict, a config.json path or a model directory, got {type(config).__name__}")
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"config: {path} does not exist; pass a Hugging Face model directory or its config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"config: {path} is not valid JSON ({e}); re-save it with save_pretrained") from None
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} holds a {type(data).__name__}, not a JSON object")
    return data


def from_hf_config(config: Mapping | str | os.PathLike, **overrides) -> ModelSpec:
    """Map a Hugging Face causal-LM config onto megatron-core.

    ``config``: a dict, a ``config.json`` path or a model directory. ``overrides``: megatron
    TransformerConfig fields (e.g. ``tensor_model_parallel_size=2``, ``params_dtype=torch.bfloat16``,
    ``perform_initialization=False``; they win over mapped values) and
    ``make_vocab_size_divisible_by`` (default 1: no padding; the padding multiple is this
    times the TP size) and ``recompute_activation_function`` (dense MLPs drop their activation
    output and recompute it in backward; MoE experts are not affected). Unknown ``model_type`` ->
    ValueError naming the registered ones;
    unsupported values -> ValueError naming the key.
    """
    hf = read_hf_config(config)
    arch = architectures.get_architecture(hf.get("model_type"))
    _check_keys(arch, hf)
    values = _resolve(arch, hf)
    divisible_by = overrides.pop("make_vocab_size_divisible_by", 1)
    recompute_activation = bool(overrides.pop("recompute_activation_function", False))
    tc_kwargs = _transformer_kwargs(arch, values)
    mla = arch.layer_kind == "mla_moe"
    options: dict[str, Any] = {}
    if arch.layer_kind == "moe":
        tc_kwargs.update(moe_config.moe_kwargs(arch, hf, values))
    elif mla:
        mla_kwargs, options = moe_config.deepseek_kwargs(arch, hf, values)
        tc_kwargs.update(mla_kwargs)
    options["recompute_activation"] = recompute_activation
    rope = _rope_settings(values, tc_kwargs["kv_channels"])
    if rope.attention_factor != 1.0 and not mla:
        # HF multiplies cos and sin by the factor m; q and k are both rotated, so every score
        # q.k is scaled by m**2 — exactly a softmax scale of m**2 / sqrt(head_dim).
        # (megatron's MLA applies YaRN itself, mscale included.)
        tc_kwargs["softmax_scale"] = rope.attention_factor**2 / math.sqrt(tc_kwargs["kv_channels"])
    tc_kwargs.update(_check_overrides(overrides))
    if arch.layer_kind in ("moe", "mla_moe"):
        moe_config.check_moe_overrides(tc_kwargs)
        if tc_kwargs.get("moe_permute_fusion"):
            moe_permute.install()  # before TransformerConfig, which checks that the fused hooks exist
    if mla:
        hf = moe_config.check_deepseek_overrides(tc_kwargs, hf, options["deepseek_routing"])
    tconfig = (MLATransformerConfig if mla else TransformerConfig)(**tc_kwargs)
    vocab = values["vocab_size"]
    return ModelSpec(
        architecture=arch.model_type,
        config=tconfig,
        layer_specs=layer_specs(arch, tconfig, options),
        vocab_size=vocab,
        padded_vocab_size=_pad_vocab(vocab, divisible_by, tconfig.tensor_model_parallel_size),
        max_position_embeddings=values["max_position_embeddings"],
        rope=rope,
        tie_word_embeddings=values["tie_word_embeddings"],
        hf_config=ReadOnlyDict(hf),
    )


def without_absent_mtp(spec: ModelSpec, present: bool, overrides: Mapping[str, Any], where: object) -> ModelSpec:
    """``spec`` rebuilt without MTP layers when its config asks for some but the checkpoint at ``where``
    holds none (``present`` False; transformers' save_pretrained drops them), with one warning. An
    explicit ``mtp_num_layers`` in ``overrides`` is kept (loading then names the missing tensors)."""
    if not spec.config.mtp_num_layers or present or "mtp_num_layers" in overrides:
        return spec
    _log.warning(
        "%s: config.json asks for %d MTP layer(s) but the checkpoint has no MTP tensors; building the main model only",
        where,
        spec.config.mtp_num_layers,
    )
    return from_hf_config(dict(spec.hf_config), **{**overrides, "mtp_num_layers": 0})


def _check_keys(arch: Architecture, hf: dict) -> None:
    for name, reason in architectures.REJECTED_KEYS.items():
        if hf.get(name) is not None:
            raise ValueError(f"config.json: {name} is set: {reason}")
    for k in arch.keys:
        if k.supported is not None and k.name in hf and hf[k.name] not in k.supported:
            allowed = " or ".join(map(repr, k.supported))
            raise ValueError(
                f"config.json: {k.name}={hf[k.name]!r} is not supported for {arch.model_type} ({k.note}); only {allowed}"
            )
    known = {k.name for k in arch.keys} | architectures.GENERIC_IGNORED_KEYS
    unknown = sorted(set(hf) - known)
    if unknown:
        warnings.warn(
            f"config.json keys not read for {arch.model_type} (they are assumed not to change the network): {', '.join(unknown)}",
            stacklevel=3,
        )


def _resolve(arch: Architecture, hf: dict) -> dict[str, Any]:
    """Every table key's value, HF's default where absent; derived defaults computed."""
    values = {k.name: hf.get(k.name, k.default) for k in arch.keys}
    for name in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "max_position_embeddings",
    ):
        positive_int(name, values[name])
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    positive_int("num_key_value_heads", values["num_key_value_heads"])
    if values["num_attention_heads"] % values["num_key_value_heads"]:
        raise ValueError(
            f"config.json: num_key_value_heads={values['num_key_value_heads']} must divide "
            f"num_attention_heads={values['num_attention_heads']}"
        )
    if values["head_dim"] is None and "qk_rope_head_dim" in values:
        values["head_dim"] = values["qk_rope_head_dim"]  # MLA: transformers' derived head_dim (the rope part)
    if values["head_dim"] is None:
        if values["hidden_size"] % values["num_attention_heads"]:
            raise ValueError(
                f"config.json: hidden_size={values['hidden_size']} is not a multiple of num_attention_heads="
                f"{values['num_attention_heads']}; set head_dim explicitly"
            )
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    positive_int("head_dim", values["head_dim"])
    for name in ("rms_norm_eps", "initializer_range", "attention_dropout"):
        finite_number(name, values[name])
    if not isinstance(values["tie_word_embeddings"], bool):
        raise ValueError(f"config.json: tie_word_embeddings={values['tie_word_embeddings']!r} must be true or false")
    return values


def _linear_bias(v: dict[str, Any]) -> bool:
    """Llama's attention_bias + mlp_bias -> megatron add_bias_linear (one switch for o_proj and the MLP)."""
    if "mlp_bias" not in v:
        return False
    attention, mlp = v.get("attention_bias", False), v["mlp_bias"]
    if attention != mlp:
        raise ValueError(
            f"config.json: attention_bias={attention} and mlp_bias={mlp} must be equal: megatron's add_bias_linear "
            "builds the o_proj and MLP biases together"
        )
    return bool(mlp)


def _transformer_kwargs(arch: Architecture, v: dict[str, Any]) -> dict[str, Any]:
    # Only the dense families read the per-layer window keys; MoE ones accept no window (checked).
    window_size, skip_freq = _window(v) if "max_window_layers" in v else (None, None)
    linear_bias = _linear_bias(v)
    return dict(
        num_layers=v["num_hidden_layers"],
        hidden_size=v["hidden_size"],
        ffn_hidden_size=v["intermediate_size"],
        num_attention_heads=v["num_attention_heads"],
        num_query_groups=v["num_key_value_heads"],
        kv_channels=v["head_dim"],
        layernorm_epsilon=float(v["rms_norm_eps"]),
        normalization="RMSNorm",
        # hidden_act was checked to be silu: SwiGLU over fc1 = [gate | up].
        gated_linear_unit=True,
        activation_func=F.silu,
        # MLP applies the activation module of the layer spec (our mindspeed_kernels swiglu) only
        # under this flag; megatron named it for TransformerEngine but the code path is generic.
        use_te_activation_func=True,
        bias_activation_fusion=False,
        add_bias_linear=linear_bias,
        add_qkv_bias=arch.qkv_bias or linear_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=float(v["attention_dropout"]),
        init_method_std=float(v["initializer_range"]),
        window_size=window_size,
        window_attn_skip_freq=skip_freq,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        cuda_graph_scope=[],  # megatron's default "full" means the same but warns on every config
        use_cpu_initialization=accelerator.device_type() == "cpu",
    )


def _window(v: dict[str, Any]) -> tuple[tuple[int, int] | None, list[int] | None]:
    """HF sliding-window keys -> (window_size, window_attn_skip_freq) of megatron."""
    layers = v["num_hidden_layers"]
    window = v["sliding_window"] if v["use_sliding_window"] else None
    kinds = v["layer_types"]
    if kinds is None:
        start = v["max_window_layers"]
        kinds = ["sliding_attention" if window is not None and i >= start else "full_attention" for i in range(layers)]
    if not isinstance(kinds, list) or len(kinds) != layers or set(kinds) - {"full_attention", "sliding_attention"}:
        raise ValueError(
            f"config.json: layer_types={kinds!r} must list full_attention or sliding_attention for each of the {layers} layers"
        )
    sliding = [k == "sliding_attention" for k in kinds]
    if window is None or not any(sliding):
        # transformers: "sliding_attention" layers without a window attend to everything.
        return None, None
    positive_int("sliding_window", window)
    # HF: key j is visible from query i when i - W < j <= i, i.e. W - 1 keys back (TE's convention).
    return (window - 1, 0), (None if all(sliding) else [int(s) for s in sliding])


def _rope_settings(v: dict[str, Any], dim: int) -> RopeSettings:
    params = dict(v["rope_scaling"] or v["rope_parameters"] or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_KEYS:
        raise ValueError(
            f"config.json: rope type {rope_type!r} is not implemented; supported: {', '.join(_ROPE_KEYS)} "
            "(dynamic, linear and longrope are not)"
        )
    extra = set(params) - _ROPE_KEYS["default"] - _ROPE_KEYS.get(rope_type, set())
    if extra:
        raise ValueError(f"config.json: rope parameters {sorted(extra)} are not read for rope type {rope_type!r}; remove them")
    base = params.get("rope_theta", v["rope_theta"])
    finite_number("rope_theta", base)
    partial = params.get("partial_rotary_factor", v.get("partial_rotary_factor", 1.0))
    if partial not in (1, 1.0):
        raise ValueError(f"config.json: partial_rotary_factor={partial!r} is not supported (partial RoPE); only 1.0")
    if rope_type == "default":
        return RopeSettings(dim, float(base), None, 1.0, rope_type)
    original = params.get("original_max_position_embeddings", v["max_position_embeddings"])
    if rope_type == "llama3":
        scaling = RopeScaling(
            "llama3",
            _param(params, "factor"),
            original,
            _param(params, "low_freq_factor"),
            _param(params, "high_freq_factor"),
        )
        return RopeSettings(dim, float(base), scaling, 1.0, rope_type)
    return _yarn(params, dim, float(base), original, v["max_position_embeddings"])


def _param(params: dict, name: str) -> float:
    value = params.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.json: rope parameter {name}={value!r} must be a number")
    return float(value)


def _yarn(params: dict, dim: int, base: float, original: int, max_positions: int) -> RopeSettings:
    if params.get("truncate", True) is not True:
        raise ValueError("config.json: yarn truncate=false is not implemented; only truncated correction ranges")
    factor = params.get("factor")
    # transformers: a missing factor is the context extension max_position_embeddings / original.
    factor = max_positions / original if factor is None else _param(params, "factor")
    # transformers treats 0/None betas as absent (``or`` defaults).
    beta_fast = float(params.get("beta_fast") or 32.0)
    beta_slow = float(params.get("beta_slow") or 1.0)
    scaling = RopeScaling("yarn", factor, original, beta_fast=beta_fast, beta_slow=beta_slow)
    return RopeSettings(dim, base, scaling, _yarn_attention_factor(params, factor), "yarn")


def _yarn_attention_factor(params: dict, factor: float) -> float:
    """HF's rule: an explicit attention_factor, else mscale ratio when both are truthy, else 0.1 ln(s) + 1."""
    explicit = params.get("attention_factor")
    if explicit is not None:
        return _param(params, "attention_factor")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = params.get("mscale"), params.get("mscale_all_dim")
    if m and m_all:
        return mscale(factor, float(m)) / mscale(factor, float(m_all))
    return mscale(factor)


def _check_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(
            f"from_hf_config: unknown override(s) {', '.join(unknown)}; pass megatron TransformerConfig fields "
            f"or {', '.join(SPEC_OVERRIDES)}"
        )
    return overrides


def _pad_vocab(vocab: int, divisible_by, tp: int) -> int:
    if isinstance(divisible_by, bool) or not isinstance(divisible_by, int) or divisible_by <= 0:
        raise ValueError(f"make_vocab_size_divisible_by={divisible_by!r} must be a positive integer")
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple
