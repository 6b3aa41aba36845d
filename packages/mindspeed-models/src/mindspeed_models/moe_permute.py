"""megatron's fused MoE token permutation (``moe_permute_fusion=True``) through mindspeed_kernels.

megatron-core's token dispatchers call five module-level functions of
``megatron.core.transformer.moe.moe_utils`` when ``config.moe_permute_fusion`` is set; without
TransformerEngine they are ``None`` and the flag is refused. :func:`install` fills exactly those
names (the table :data:`FUSED`) with implementations over
:func:`mindspeed_kernels.ops.moe_token_permute` / :func:`~mindspeed_kernels.ops.moe_token_unpermute`
(``npu_moe_token_permute`` / ``unpermute`` on Ascend), and leaves TransformerEngine's own kernels
in place where they exist. Nothing changes for models with ``moe_permute_fusion=False``.

Contract (as TransformerEngine's, which megatron relies on): rows come out grouped by expert,
tokens in ascending order inside an expert (megatron's unfused order, so ``tokens_per_expert``
splits line up); the returned ``row_id_map`` is opaque to megatron and only handed back to
:func:`fused_unpermute`.
"""

from __future__ import annotations

import torch

from mindspeed_kernels import ops

__all__ = ["FUSED", "fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
           "fused_sort_chunks_by_index_with_probs", "fused_unpermute", "install"]  # fmt: skip


def _slots(routing_map: torch.Tensor) -> tuple[torch.Tensor, int]:
    """routing_map [T, E] bool -> (expert ids [T, K] in ascending order, padded with E past a token's
    own experts so those slots sort last and are cut; number of real slots)."""
    tokens, experts = routing_map.shape
    ids = torch.arange(experts, device=routing_map.device).expand(tokens, experts)
    ids = torch.where(routing_map, ids, experts).sort(dim=1).values
    width = int(routing_map.sum(1).max()) if tokens else 0
    return ids[:, : max(width, 1)], int(routing_map.sum())


def _permute(tokens: torch.Tensor, routing_map: torch.Tensor, num_out_tokens: int | None):
    ids, real = _slots(routing_map)
    if num_out_tokens is not None and num_out_tokens != real:
        raise ValueError(f"fused_permute: num_out_tokens={num_out_tokens} but the routing map selects {real} slots")
    permuted, sorted_slots = ops.moe_token_permute(tokens, ids, num_out_tokens=real)
    # row_id_map [2, T*K]: the slot each output row came from, and each slot's expert (for merging probs).
    return permuted, ids, torch.stack([sorted_slots.long(), ids.flatten()])


def fused_permute(tokens: torch.Tensor, routing_map: torch.Tensor, num_out_tokens: int | None = None):
    """tokens [T, H], routing_map [T, E] bool -> (permuted [R, H] grouped by expert, row_id_map)."""
    permuted, _, row_id_map = _permute(tokens, routing_map, num_out_tokens)
    return permuted, row_id_map


def fused_permute_with_probs(tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor,
                             num_out_tokens: int | None = None):  # fmt: skip
    """As :func:`fused_permute`, plus each output row's routing probability (probs [T, E] -> [R])."""
    permuted, ids, row_id_map = _permute(tokens, routing_map, num_out_tokens)
    per_slot = probs.gather(1, ids.clamp(max=probs.shape[1] - 1)).flatten()
    return permuted, per_slot[row_id_map[0, : permuted.shape[0]]], row_id_map


def fused_unpermute(permuted_tokens: torch.Tensor, row_id_map: torch.Tensor, merging_probs: torch.Tensor | None = None,
                    restore_shape: torch.Size | None = None) -> torch.Tensor:  # fmt: skip
    """Back to token order [T, H], summing each token's expert rows, weighted by ``merging_probs``
    [T, E] when given (dropped slots add nothing)."""
    slots = row_id_map.shape[1]
    tokens = restore_shape[0] if restore_shape is not None else slots
    width = slots // max(tokens, 1)
    ids = row_id_map[1].view(tokens, width)
    if merging_probs is None:
        weights = torch.ones(tokens, width, dtype=permuted_tokens.dtype, device=permuted_tokens.device)
    else:
        weights = merging_probs.gather(1, ids.clamp(max=merging_probs.shape[1] - 1)).to(permuted_tokens.dtype)
    return ops.moe_token_unpermute(permuted_tokens, row_id_map[0], weights)


def fused_sort_chunks_by_index(inputs: torch.Tensor, split_sizes: torch.Tensor, sorted_idxs: torch.Tensor) -> torch.Tensor:
    """Split ``inputs`` rows into chunks of ``split_sizes`` and concatenate them in ``sorted_idxs`` order."""
    chunks = torch.split(inputs, split_sizes.tolist(), dim=0)
    return torch.cat([chunks[i] for i in sorted_idxs.tolist()], dim=0)


def fused_sort_chunks_by_index_with_probs(inputs: torch.Tensor, probs: torch.Tensor, split_sizes: torch.Tensor,
                                          sorted_idxs: torch.Tensor):  # fmt: skip
    """:func:`fused_sort_chunks_by_index` of ``inputs`` and of ``probs`` (same rows)."""
    return (fused_sort_chunks_by_index(inputs, split_sizes, sorted_idxs),
            fused_sort_chunks_by_index(probs, split_sizes, sorted_idxs))  # fmt: skip


FUSED = {
    "fused_permute": fused_permute,
    "fused_permute_with_probs": fused_permute_with_probs,
    "fused_unpermute": fused_unpermute,
    "fused_sort_chunks_by_index": fused_sort_chunks_by_index,
    "fused_sort_chunks_by_index_with_probs": fused_sort_chunks_by_index_with_probs,
}
"""megatron.core.transformer.moe.moe_utils name -> our implementation."""

_OTHER_TE_HELPERS = ("fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_topk_with_score_function",
                     "te_general_gemm")  # fmt: skip


def install() -> bool:
    """Fill megatron's missing fused-permutation hooks with :data:`FUSED` (idempotent). Returns True when
    ours are in place, False when TransformerEngine's are (left untouched)."""
    from megatron.core.transformer.moe import moe_utils

    if all(getattr(moe_utils, name, None) is fn for name, fn in FUSED.items()):
        return True
    if any(getattr(moe_utils, name, None) is not None for name in FUSED):
        return False  # TransformerEngine is installed: its fused kernels stay
    for name, fn in FUSED.items():
        setattr(moe_utils, name, fn)
    # Without TransformerEngine megatron imports none of its fused helpers and checks HAVE_TE next to
    # each call. The other helpers are set to None, so asking for them still fails with megatron's
    # own "not available" error while HAVE_TE lets the five above through.
    for name in _OTHER_TE_HELPERS:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)
    moe_utils.HAVE_TE = True
    return True
