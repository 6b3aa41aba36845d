"""The data types of the name maps: patterns (per architecture), layouts (per config), rules.

An :class:`Architecture` is a table of :class:`Pattern`s with ``{layer}``, ``{expert}`` and
``{mtp}`` placeholders plus a ``read`` function turning an HF ``config.json`` into a
:class:`Layout` (dimensions, feature flags, which layers are MoE, how many MTP layers).
Expanding the patterns against the layout gives concrete :class:`Rule`s, one per megatron
tensor (plus alias rules for HF tensors that duplicate another one).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mindspeed_ckpt.maps.transforms import TRANSFORMS

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Pattern:
    """One row of an architecture table.

    hf: HF tensor name patterns, in the order the transform takes them.
    mcore: megatron-core name pattern (``decoder.layers.{layer}.`` for layer patterns).
    shapes: per HF name, the shape as symbols of ``Layout.dims`` (e.g. ``("q", "hidden")``).
    transform: key of ``transforms.TRANSFORMS``; params: the dims it receives.
    when: a ``Layout.features`` flag that must be set for the row to apply.
    alias / optional: see :class:`Rule`.
    """

    hf: tuple[str, ...]
    mcore: str
    shapes: tuple[tuple[str, ...], ...]
    transform: str = "copy"
    params: tuple[str, ...] = ()
    when: str | None = None
    alias: bool = False
    optional: bool = False


def P(hf: str | tuple[str, ...], mcore: str, *shapes: tuple[str, ...], **kw: Any) -> Pattern:
    """Compact table row: ``P("model.norm.weight", "decoder.final_layernorm.weight", ("hidden",))``."""
    names = (hf,) if isinstance(hf, str) else tuple(hf)
    if len(shapes) != len(names):
        raise ValueError(f"pattern for {mcore!r}: {len(names)} HF names but {len(shapes)} shapes")
    return Pattern(hf=names, mcore=mcore, shapes=tuple(shapes), **kw)


@dataclass(frozen=True)
class Rule:
    """How one megatron tensor is made from HF tensors, and back (TP=1, PP=1, EP=1).

    hf: concrete HF tensor names, in transform order; hf_shapes: their expected shapes.
    mcore: concrete megatron-core name; mcore_shape: its expected shape (vocab rows padded).
    transform: key of ``transforms.TRANSFORMS``; params: the integers it needs, as pairs.
    alias: another rule owns ``mcore``; this HF tensor is a copy of it (DeepSeek's per-MTP-layer
        ``embed_tokens`` / ``shared_head.head``, a tied ``lm_head``). HF -> megatron produces the
        same megatron tensor again, which must equal the owner's; megatron -> HF writes a copy.
    optional: the HF tensor may be absent (skip the rule then) and is not written back (a tied
        ``lm_head``).
    """

    hf: tuple[str, ...]
    mcore: str
    transform: str
    hf_shapes: tuple[Shape, ...]
    mcore_shape: Shape
    params: tuple[tuple[str, int], ...] = ()
    alias: bool = False
    optional: bool = False


@dataclass(frozen=True)
class Layout:
    """What a config implies for the maps.

    dims: shape symbols -> sizes (``hidden``, ``vocab``, ``padded_vocab``, ``q``, ``kv``, ...).
    features: flags naming optional tensors (``qkv_bias``, ``qk_norm``, ``tied``, ``untied``...).
    num_layers: decoder layers; moe_layers: indices (decoder, then MTP at ``num_layers + k``)
    whose MLP is a mixture of experts; num_mtp: multi-token-prediction layers.
    """

    dims: Mapping[str, int]
    features: frozenset[str]
    num_layers: int
    moe_layers: frozenset[int] = frozenset()
    num_mtp: int = 0


@dataclass(frozen=True)
class Architecture:
    """The name map of one HF ``model_type``.

    read: ``hf_config -> Layout``; raises ValueError for settings the map does not cover.
    embed / final: patterns before and after the layers (no placeholders).
    attention, dense_mlp, moe: per-layer patterns (``{layer}``); moe applies to MoE layers
    instead of dense_mlp, together with ``expert`` (``{layer}``, ``{expert}``) per expert.
    mtp: the extra tensors of MTP layer ``{mtp}``, whose HF index is ``{layer}``; its
    transformer layer reuses the layer patterns under ``mtp.layers.{mtp}.transformer_layer``.
    ignore: regexes of HF names that HF itself does not load (skipped, not errors).
    """

    model_type: str
    read: Callable[[Mapping[str, Any]], Layout]
    embed: tuple[Pattern, ...]
    attention: tuple[Pattern, ...]
    dense_mlp: tuple[Pattern, ...]
    final: tuple[Pattern, ...]
    moe: tuple[Pattern, ...] = ()
    expert: tuple[Pattern, ...] = ()
    mtp: tuple[Pattern, ...] = ()
    ignore: tuple[str, ...] = field(default=(r"\.rotary_emb\.inv_freq$",))


def expand(patterns: tuple[Pattern, ...], layout: Layout, **subs: int) -> list[Rule]:
    """Concrete rules of the patterns whose ``when`` flag is set, placeholders filled by ``subs``."""
    out = []
    for p in patterns:
        if p.when is not None and p.when not in layout.features:
            continue
        hf_shapes = tuple(tuple(layout.dims[s] for s in shape) for shape in p.shapes)
        params = tuple((name, layout.dims[name]) for name in p.params)
        mcore_shape = TRANSFORMS[p.transform].mcore_shape(hf_shapes, dict(params))
        out.append(
            Rule(
                hf=tuple(n.format(**subs) for n in p.hf),
                mcore=p.mcore.format(**subs),
                transform=p.transform,
                hf_shapes=hf_shapes,
                mcore_shape=mcore_shape,
                params=params,
                alias=p.alias,
                optional=p.optional,
            )
        )
    return out


def rename_mcore(rules: list[Rule], old_prefix: str, new_prefix: str) -> list[Rule]:
    """Move layer rules under another megatron prefix (decoder layer -> MTP transformer layer)."""
    out = []
    for r in rules:
        if not r.mcore.startswith(old_prefix):
            raise ValueError(f"layer rule {r.mcore!r} does not start with {old_prefix!r}")
        out.append(replace(r, mcore=new_prefix + r.mcore[len(old_prefix) :]))
    return out


LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
