"""Expanding an architecture's patterns for one config, applying rules, whole-dict conversion."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported lazily: rules() and layout() serve the torch-free fast path
    import torch

from mindspeed_ckpt.maps.config import model_type
from mindspeed_ckpt.maps.registry import architecture
from mindspeed_ckpt.maps.spec import LAYER_INDEX, Architecture, Layout, Rule, expand, rename_mcore
from mindspeed_ckpt.maps.transforms import TRANSFORMS

Getter = Callable[[str], "torch.Tensor"]
EMBEDDING = "embedding.word_embeddings.weight"


def layout(hf_config: Mapping[str, Any], *, padded_vocab_size: int | None = None) -> Layout:
    """The :class:`Layout` (dims, features, MoE layers, MTP count) ``hf_config`` implies;
    ``dims["padded_vocab"]`` is ``padded_vocab_size`` or the vocabulary size."""
    lay = architecture(model_type(hf_config)).read(hf_config)
    vocab = lay.dims["vocab"]
    if padded_vocab_size is None:
        padded_vocab_size = vocab
    if isinstance(padded_vocab_size, bool) or not isinstance(padded_vocab_size, int) or padded_vocab_size < vocab:
        raise ValueError(f"padded_vocab_size must be an integer >= hf_config vocab_size ({vocab}); got {padded_vocab_size!r}")
    return replace(lay, dims={**lay.dims, "padded_vocab": padded_vocab_size})


def _layer_rules(arch: Architecture, lay: Layout, layer: int) -> list[Rule]:
    is_moe = layer in lay.moe_layers
    out = expand(arch.attention, lay, layer=layer) + expand(arch.moe if is_moe else arch.dense_mlp, lay, layer=layer)
    if is_moe:
        for e in range(lay.dims["experts"]):
            out += expand(arch.expert, lay, layer=layer, expert=e)
    return out


def rules(hf_config: Mapping[str, Any], *, padded_vocab_size: int | None = None) -> list[Rule]:
    """Every rule of the model ``hf_config`` describes, in order: embedding, decoder layers
    (attention, then dense MLP or router/shared experts/experts), final norm and output
    layer, then MTP layers. One non-alias rule per megatron tensor (TP=1, PP=1, EP=1).

    padded_vocab_size: megatron's embedding/output row count (default: ``vocab_size``).
    Raises ValueError for an unsupported ``model_type`` or an incomplete config.
    """
    arch = architecture(model_type(hf_config))
    lay = layout(hf_config, padded_vocab_size=padded_vocab_size)
    out = expand(arch.embed, lay)
    for i in range(lay.num_layers):
        out += _layer_rules(arch, lay, i)
    out += expand(arch.final, lay)
    for k in range(lay.num_mtp):
        i = lay.num_layers + k
        out += expand(arch.mtp, lay, layer=i, mtp=k)
        out += rename_mcore(_layer_rules(arch, lay, i), f"decoder.layers.{i}.", f"mtp.layers.{k}.transformer_layer.")
    return out


def ignored_hf(hf_config: Mapping[str, Any]) -> Callable[[str], bool]:
    """Predicate: is this HF tensor one HF itself does not load (skipped by hf_to_mcore)?
    Covers rotary ``inv_freq`` buffers and, for MTP families, layers past the MTP layers the
    config asks for (transformers ignores them too)."""
    arch = architecture(model_type(hf_config))
    lay = arch.read(hf_config)
    patterns = [re.compile(p) for p in arch.ignore]
    last = lay.num_layers + lay.num_mtp

    def ignored(name: str) -> bool:
        if any(p.search(name) for p in patterns):
            return True
        m = LAYER_INDEX.match(name) if arch.mtp else None
        return m is not None and int(m.group(1)) >= last

    return ignored


def _fetch(get: Getter, name: str, side: str, target: str) -> torch.Tensor:
    try:
        import torch

        t = get(name)
    except KeyError:
        raise ValueError(f"missing {side} tensor {name!r} (needed for {target!r})") from None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{side} tensor {name!r} must be a torch.Tensor; got {type(t).__name__}")
    return t


def _check_shape(t: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {tuple(expected)} from hf_config")


def apply_hf_to_mcore(rule: Rule, get: Getter) -> tuple[str, torch.Tensor]:
    """Make ``rule``'s megatron tensor, pulling its HF tensors through ``get(name)`` (e.g. a
    safetensors ``safe_open(...).get_tensor``). Checks every HF shape; KeyError from ``get``
    becomes a ValueError naming the tensor. For an alias rule the result duplicates the
    owner's tensor: compare it, do not store it twice."""
    hf = []
    for name, shape in zip(rule.hf, rule.hf_shapes, strict=True):
        t = _fetch(get, name, "Hugging Face", rule.mcore)
        _check_shape(t, shape, f"Hugging Face tensor {name!r}")
        hf.append(t)
    return rule.mcore, TRANSFORMS[rule.transform].to_mcore(hf, dict(rule.params))


def apply_mcore_to_hf(rule: Rule, get: Getter) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors of ``rule`` from its megatron tensor ``get(rule.mcore)`` (shape checked).
    Alias rules return fresh copies so no two outputs share storage."""
    t = _fetch(get, rule.mcore, "megatron", ", ".join(rule.hf))
    _check_shape(t, rule.mcore_shape, f"megatron tensor {rule.mcore!r}")
    outs = TRANSFORMS[rule.transform].to_hf(t, dict(rule.params))
    if rule.alias:
        import torch

        outs = tuple(o.clone(memory_format=torch.contiguous_format) for o in outs)
    return list(zip(rule.hf, outs, strict=True))


def _mtp_hint(name: str, hf_config: Mapping[str, Any]) -> str:
    m = LAYER_INDEX.match(name)
    if m is None or int(m.group(1)) < hf_config.get("num_hidden_layers", 0):
        return ""
    return (
        f"; hf_config asks for num_nextn_predict_layers={hf_config.get('num_nextn_predict_layers')} MTP layers "
        "(transformers does not save them): set it to 0 to convert without MTP"
    )


def _check_hf_names(rule_list: list[Rule], tensors: Mapping[str, Any], hf_config: Mapping[str, Any]) -> None:
    owner = {n: r for r in rule_list for n in r.hf}
    missing = [(n, r) for r in rule_list if not r.optional for n in r.hf if n not in tensors]
    if missing:
        name, rule = missing[0]
        more = f" ({len(missing)} missing in all)" if len(missing) > 1 else ""
        raise ValueError(f"hf_to_mcore: missing Hugging Face tensor {name!r} (for megatron {rule.mcore!r}){more}"
                         f"{_mtp_hint(name, hf_config)}")
    ignored = ignored_hf(hf_config)
    extra = [n for n in tensors if n not in owner and not ignored(n)]
    if extra:
        more = f" ({len(extra)} unexpected in all)" if len(extra) > 1 else ""
        raise ValueError(f"hf_to_mcore: unexpected Hugging Face tensor {extra[0]!r}{more}: not part of the "
                         f"{model_type(hf_config)!r} map for this hf_config; check that the config matches the checkpoint")


def hf_to_mcore(
    hf_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *, padded_vocab_size: int | None = None
) -> dict[str, torch.Tensor]:
    """A full (TP=1, PP=1, EP=1) megatron-core GPTModel state dict (local layer spec names,
    no ``_extra_state`` entries) from an HF checkpoint's tensors.

    Every HF tensor must be consumed (except ``ignored_hf`` ones) and every expected one
    present with its expected shape; duplicates (tied ``lm_head``, MTP copies) must equal the
    tensor they duplicate. Embedding/output rows are zero-padded to ``padded_vocab_size``.
    Tensors keep their dtype; outputs may share storage with the inputs.
    """
    rule_list = rules(hf_config, padded_vocab_size=padded_vocab_size)
    _check_hf_names(rule_list, tensors, hf_config)
    out: dict[str, torch.Tensor] = {}
    aliases = []
    for rule in rule_list:
        if rule.optional and any(n not in tensors for n in rule.hf):
            continue
        name, t = apply_hf_to_mcore(rule, tensors.__getitem__)
        if rule.alias:
            aliases.append((rule, t))
        else:
            out[name] = t
    import torch

    for rule, t in aliases:
        if not torch.equal(out[rule.mcore], t):
            raise ValueError(f"hf_to_mcore: Hugging Face tensor {rule.hf[0]!r} differs from the tensor megatron shares "
                             f"it with ({rule.mcore!r}); megatron keeps one copy, so they must be equal")
    return out


def mcore_to_hf(hf_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The HF checkpoint tensors (Hub layout: per-expert names, MTP layers as extra
    ``model.layers``; a tied ``lm_head`` is not written) from a full megatron-core state dict.

    ``_extra_state`` entries are ignored; any other unknown or missing name is an error.
    Vocabulary padding (rows past ``hf_config["vocab_size"]``) is dropped.
    """
    import torch

    emb = tensors.get(EMBEDDING)
    padded = emb.shape[0] if isinstance(emb, torch.Tensor) else None
    vocab = layout(hf_config).dims["vocab"]
    if padded is not None and padded < vocab:
        raise ValueError(f"mcore_to_hf: megatron tensor {EMBEDDING!r} has {padded} rows, fewer than hf_config vocab_size={vocab}")
    rule_list = rules(hf_config, padded_vocab_size=padded)
    owned = [r.mcore for r in rule_list if not r.alias]
    owned_set = set(owned)
    present = [n for n in tensors if not n.endswith("._extra_state")]
    missing = [n for n in owned if n not in tensors]
    if missing:
        raise ValueError(f"mcore_to_hf: missing megatron tensor {missing[0]!r} ({len(missing)} missing in all)")
    extra = [n for n in present if n not in owned_set]
    if extra:
        raise ValueError(f"mcore_to_hf: unexpected megatron tensor {extra[0]!r} ({len(extra)} unexpected in all) "
                         f"for model_type {model_type(hf_config)!r} and this hf_config")
    out: dict[str, torch.Tensor] = {}
    for rule in rule_list:
        if not rule.optional:
            out.update(apply_mcore_to_hf(rule, tensors.__getitem__))
    return out
