"""MoE token permute / unpermute with index_select and index_add (no per-token Python loops)."""

from __future__ import annotations

import torch


def moe_token_permute(tokens, indices, num_out_tokens=None):
    """See :func:`mindspeed_kernels.ops.moe_token_permute`."""
    top_k = 1 if indices.dim() == 1 else indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.sort(flat, stable=True).indices  # stable: ties keep (token, slot) order
    keep = flat.numel() if num_out_tokens is None else num_out_tokens
    permuted = tokens.index_select(0, order[:keep] // top_k)
    return permuted, order.to(torch.int32)


def moe_token_unpermute(permuted_tokens, sorted_indices, probs=None):
    """See :func:`mindspeed_kernels.ops.moe_token_unpermute`."""
    top_k = 1 if probs is None else probs.shape[1]
    num_tokens = sorted_indices.numel() // top_k
    rows = permuted_tokens.shape[0]
    source = sorted_indices[:rows].long()  # rows beyond R were dropped: they add nothing
    acc_dtype = torch.promote_types(permuted_tokens.dtype, torch.float32)  # sum K copies in >= float32
    contrib = permuted_tokens.to(acc_dtype)
    if probs is not None:
        contrib = contrib * probs.reshape(-1).index_select(0, source).to(acc_dtype).unsqueeze(-1)
    out = contrib.new_zeros(num_tokens, permuted_tokens.shape[1]).index_add(0, source // top_k, contrib)
    return out.to(permuted_tokens.dtype)
