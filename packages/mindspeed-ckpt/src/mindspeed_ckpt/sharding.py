"""Tensor-parallel split/merge and pipeline-stage placement of megatron-core GPTModel tensors.

TP (megatron-core local spec): column-parallel layers are split along dim 0 (``linear_qkv``,
whose rows are already grouped per query group so a plain chunk keeps groups whole;
``linear_fc1``, whose gate and up halves are split separately and re-concatenated per rank;
``word_embeddings`` and ``output_layer`` by vocabulary row); row-parallel layers along dim 1
(``linear_proj``, ``linear_fc2``; their biases are replicated); norms are replicated.

MLA: every projection into the attention (``linear_q_proj``, ``linear_q_down_proj``,
``linear_q_up_proj``, ``linear_kv_down_proj``, ``linear_kv_up_proj``) is a
ColumnParallelLinear in the local spec, split along dim 0 (megatron gathers the down
projections' outputs before the latent norms, which are replicated). MTP's ``eh_proj`` is
column-parallel too. MoE: routed experts are not split (expert TP = 1); the router weight,
its expert bias and the shared-expert gate are replicated; shared experts split like a dense
MLP. Pipeline and expert placement live in :mod:`mindspeed_ckpt.placement`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: tp_dim and the size checks serve the torch-free fast path
    import torch

COLUMN = ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight",
          "linear_q_proj.weight", "linear_q_down_proj.weight", "linear_q_up_proj.weight", "linear_kv_down_proj.weight",
          "linear_kv_up_proj.weight", "eh_proj.weight")
GATE_UP = ("linear_fc1.weight", "linear_fc1.bias")
ROW = ("linear_proj.weight", "linear_fc2.weight")

EXPERT = ".mlp.experts.local_experts."


def tp_dim(name: str) -> int | None:
    """The dimension ``name`` is split along under TP, or None when replicated."""
    if EXPERT in name:
        return None  # expert tensor parallelism is 1: each expert whole on its EP rank
    if name.endswith(COLUMN) or name.endswith(GATE_UP):
        return 0
    if name.endswith(ROW):
        return 1
    return None


def _chunks(t: torch.Tensor, parts: int, dim: int, name: str) -> list[torch.Tensor]:
    import torch

    if t.shape[dim] % parts:
        raise ValueError(f"megatron tensor {name!r}: dim {dim} of size {t.shape[dim]} is not divisible by --tp {parts}")
    return list(torch.chunk(t, parts, dim=dim))


def split_tp(name: str, t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s shard of the full tensor ``t`` (a fresh contiguous tensor, so saving it
    does not save the full tensor's storage)."""
    import torch

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
    import torch

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


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: ``vocab`` rounded up to a multiple of ``divisible_by * tp``."""
    if divisible_by < 1:
        raise ValueError(f"--make-vocab-size-divisible-by must be >= 1; got {divisible_by}")
    step = divisible_by * tp
    return -(-vocab // step) * step


def check_tp(dims: dict[str, int], tp: int) -> None:
    """Refuse a TP size that does not divide the heads, query groups, MLP or shared-expert
    width, or the MLA low-rank dims (``dims`` as in ``maps.Layout.dims``; absent keys skipped)."""
    if tp < 1:
        raise ValueError(f"--tp must be >= 1; got {tp}")
    checks = (("heads", "num_attention_heads"), ("groups", "num_key_value_heads"), ("ffn", "intermediate_size"),
              ("shared_ffn", "the shared experts' intermediate size"), ("q_lora", "q_lora_rank"),
              ("kv_down", "kv_lora_rank + qk_rope_head_dim"))
    for key, what in checks:
        if key in dims and dims[key] % tp:
            raise ValueError(f"--tp {tp} does not divide {what}={dims[key]} (config.json); pick a TP size that divides it")
