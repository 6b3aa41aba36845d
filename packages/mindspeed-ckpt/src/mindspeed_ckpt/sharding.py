"""Tensor-parallel split/merge and pipeline-stage placement of megatron-core GPTModel tensors.

TP (megatron-core local spec): column-parallel layers are split along dim 0 (``linear_qkv``,
whose rows are already grouped per query group so a plain chunk keeps groups whole;
``linear_fc1``, whose gate and up halves are split separately and re-concatenated per rank;
``word_embeddings`` and ``output_layer`` by vocabulary row); row-parallel layers along dim 1
(``linear_proj``, ``linear_fc2``; their biases are replicated); norms are replicated.

PP: decoder layers are split evenly over stages and renumbered from 0 on each; the embedding
lives on the first stage, ``final_layernorm`` and ``output_layer`` on the last.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")
GATE_UP = ("linear_fc1.weight", "linear_fc1.bias")
ROW = ("linear_proj.weight", "linear_fc2.weight")

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
OUTPUT = "output_layer.weight"
EMBEDDING = "embedding.word_embeddings.weight"


def tp_dim(name: str) -> int | None:
    """The dimension ``name`` is split along under TP, or None when replicated."""
    if name.endswith(COLUMN) or name.endswith(GATE_UP):
        return 0
    if name.endswith(ROW):
        return 1
    return None


def _chunks(t: torch.Tensor, parts: int, dim: int, name: str) -> list[torch.Tensor]:
    if t.shape[dim] % parts:
        raise ValueError(f"megatron tensor {name!r}: dim {dim} of size {t.shape[dim]} is not divisible by --tp {parts}")
    return list(torch.chunk(t, parts, dim=dim))


def split_tp(name: str, t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s shard of the full tensor ``t`` (a fresh contiguous tensor, so saving it
    does not save the full tensor's storage)."""
    dim = tp_dim(name)
    if dim is None or tp == 1:
        piece = t
    elif name.endswith(GATE_UP):
        gate, up = _chunks(t, 2, 0, name)
        piece = torch.cat([_chunks(gate, tp, 0, name)[rank], _chunks(up, tp, 0, name)[rank]], dim=0)
    else:
        piece = _chunks(t, tp, dim, name)[rank]
    return piece.clone(memory_format=torch.contiguous_format)


def merge_tp(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from its TP shards (inverse of :func:`split_tp`); replicated tensors
    must agree across ranks."""
    dim = tp_dim(name)
    if len(shards) == 1:
        return shards[0]
    if dim is None:
        for r, s in enumerate(shards[1:], start=1):
            if not torch.equal(s, shards[0]):
                raise ValueError(f"megatron tensor {name!r} is replicated under TP but differs between rank 0 and rank {r}")
        return shards[0]
    if name.endswith(GATE_UP):
        halves = [_chunks(s, 2, 0, name) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


@dataclass(frozen=True)
class Stages:
    """Pipeline placement: ``num_layers`` decoder layers over ``pp`` stages."""

    num_layers: int
    pp: int

    def __post_init__(self):
        if self.pp < 1 or self.num_layers % self.pp:
            raise ValueError(f"--pp {self.pp} must divide num_hidden_layers={self.num_layers}")

    @property
    def per_stage(self) -> int:
        return self.num_layers // self.pp

    def place(self, name: str) -> tuple[int, str]:
        """(stage, name in that stage's state dict) of a full-model megatron tensor name."""
        m = _LAYER.match(name)
        if m is not None:
            i = int(m.group(1))
            return i // self.per_stage, f"decoder.layers.{i % self.per_stage}.{m.group(2)}"
        if name.startswith("embedding."):
            return 0, name
        if name.startswith(("decoder.final_layernorm.", "output_layer.")):
            return self.pp - 1, name
        raise ValueError(f"megatron tensor {name!r}: no pipeline stage known for it (MTP layers are not supported yet)")

    def global_name(self, stage: int, local: str) -> str:
        """Inverse of :meth:`place` for a name found in stage ``stage``'s file."""
        m = _LAYER.match(local)
        if m is None:
            return local
        i = int(m.group(1))
        if i >= self.per_stage:
            raise ValueError(f"stage {stage} holds layer {i} but stages hold {self.per_stage} layers each")
        return f"decoder.layers.{stage * self.per_stage + i}.{m.group(2)}"


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: ``vocab`` rounded up to a multiple of ``divisible_by * tp``."""
    if divisible_by < 1:
        raise ValueError(f"--make-vocab-size-divisible-by must be >= 1; got {divisible_by}")
    step = divisible_by * tp
    return -(-vocab // step) * step


def check_tp(dims: dict[str, int], tp: int) -> None:
    """Refuse a TP size that does not divide the heads, query groups or MLP width."""
    if tp < 1:
        raise ValueError(f"--tp must be >= 1; got {tp}")
    for key, what in (("heads", "num_attention_heads"), ("groups", "num_key_value_heads"), ("ffn", "intermediate_size")):
        if dims[key] % tp:
            raise ValueError(f"--tp {tp} does not divide {what}={dims[key]} (config.json); pick a TP size that divides it")
