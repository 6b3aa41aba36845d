"""Tensor transforms between Hugging Face and megatron-core layouts (TP=1, full tensors).

Each transform is a pair of pure functions plus a shape rule, registered by name in
``TRANSFORMS``; a :class:`~mindspeed_ckpt.maps.Rule` names one and carries the integer
parameters it needs. Nothing here changes dtype or device, so a round trip is bit-identical.

Storage: ``to_mcore`` may return its input unchanged (``copy``, ``vocab`` without padding);
every tensor ``to_hf`` makes from part of a larger tensor is a fresh contiguous copy, so the
outputs of one conversion never share storage (safetensors refuses shared tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: the torch-free fast path (fastpath.py) uses the shape rules only
    import torch

Shape = tuple[int, ...]


def _fresh(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.clone(memory_format=torch.contiguous_format)


def _group_sizes(num_heads: int, num_groups: int) -> int:
    if num_groups <= 0 or num_heads % num_groups:
        raise ValueError(f"num_heads={num_heads} must be a positive multiple of num_query_groups={num_groups}")
    return num_heads // num_groups


def interleave_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
) -> torch.Tensor:
    """Stack separate q/k/v projections into megatron's fused ``linear_qkv`` layout.

    q: ``[num_heads * head_dim, *rest]``; k, v: ``[num_groups * head_dim, *rest]`` (``rest`` is
    ``(hidden,)`` for weights, ``()`` for biases). Returns ``[(num_heads + 2 * num_groups) *
    head_dim, *rest]`` whose rows are, for each query group g in order: the group's
    ``num_heads // num_groups`` q heads, then k head g, then v head g.
    """
    import torch

    per_group = _group_sizes(num_heads, num_groups)
    rest = tuple(q.shape[1:])
    qg = q.reshape(num_groups, per_group * head_dim, *rest)
    kg = k.reshape(num_groups, head_dim, *rest)
    vg = v.reshape(num_groups, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(
    qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_qkv`: ``[(num_heads + 2*num_groups) * head_dim, *rest]`` ->
    (q ``[num_heads*head_dim, *rest]``, k, v ``[num_groups*head_dim, *rest]``), fresh tensors."""
    import torch

    per_group = _group_sizes(num_heads, num_groups)
    rest = tuple(qkv.shape[1:])
    grouped = qkv.reshape(num_groups, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return tuple(_fresh(t.reshape(-1, *rest)) for t in (q, k, v))  # type: ignore[return-value]


def concat_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU ``linear_fc1``: gate rows then up rows, ``[2 * ffn, *rest]``."""
    import torch

    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`concat_gate_up`: the first half of the rows is gate, the second up."""
    if fc1.shape[0] % 2:
        raise ValueError(f"linear_fc1 has {fc1.shape[0]} rows; a gated MLP needs an even count (gate|up)")
    import torch

    gate, up = torch.chunk(fc1, 2, dim=0)
    return _fresh(gate), _fresh(up)


def pad_vocab(t: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """Append zero rows to a ``[vocab, hidden]`` embedding/output matrix up to ``padded_vocab_size``."""
    extra = padded_vocab_size - t.shape[0]
    if extra < 0:
        raise ValueError(f"padded_vocab_size={padded_vocab_size} is smaller than the vocabulary ({t.shape[0]} rows)")
    if extra == 0:
        return t
    import torch

    return torch.cat([t, t.new_zeros((extra, *t.shape[1:]))], dim=0)


def unpad_vocab(t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Drop megatron's padding rows: keep the first ``vocab_size`` rows."""
    if t.shape[0] < vocab_size:
        raise ValueError(f"tensor has {t.shape[0]} rows, fewer than vocab_size={vocab_size}")
    return t if t.shape[0] == vocab_size else _fresh(t[:vocab_size])


@dataclass(frozen=True)
class Transform:
    """One HF <-> megatron layout change. ``params`` are the rule's integers (see each entry)."""

    to_mcore: Callable[[Sequence[torch.Tensor], Mapping[str, int]], torch.Tensor]
    to_hf: Callable[[torch.Tensor, Mapping[str, int]], tuple[torch.Tensor, ...]]
    mcore_shape: Callable[[Sequence[Shape], Mapping[str, int]], Shape]
    arity: int  # how many HF tensors make one megatron tensor


def _qkv_params(p: Mapping[str, int]) -> tuple[int, int, int]:
    return p["heads"], p["groups"], p["head_dim"]


# Why a table: a Rule stores only the transform's name, so rules stay plain picklable data.
TRANSFORMS: dict[str, Transform] = {
    "copy": Transform(
        to_mcore=lambda ts, p: ts[0],
        to_hf=lambda t, p: (t,),
        mcore_shape=lambda shapes, p: shapes[0],
        arity=1,
    ),
    # params: heads, groups, head_dim
    "qkv": Transform(
        to_mcore=lambda ts, p: interleave_qkv(ts[0], ts[1], ts[2], *_qkv_params(p)),
        to_hf=lambda t, p: split_qkv(t, *_qkv_params(p)),
        mcore_shape=lambda shapes, p: (sum(s[0] for s in shapes), *shapes[0][1:]),
        arity=3,
    ),
    "gate_up": Transform(
        to_mcore=lambda ts, p: concat_gate_up(ts[0], ts[1]),
        to_hf=lambda t, p: split_gate_up(t),
        mcore_shape=lambda shapes, p: (shapes[0][0] + shapes[1][0], *shapes[0][1:]),
        arity=2,
    ),
    # params: vocab, padded_vocab
    "vocab": Transform(
        to_mcore=lambda ts, p: pad_vocab(ts[0], p["padded_vocab"]),
        to_hf=lambda t, p: (unpad_vocab(t, p["vocab"]),),
        mcore_shape=lambda shapes, p: (p["padded_vocab"], *shapes[0][1:]),
        arity=1,
    ),
}
