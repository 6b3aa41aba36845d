"""MoE token routing: permute tokens into expert order and back (torch_npu ``npu_moe_token_permute``/``unpermute``)."""

from __future__ import annotations

import torch

from mindspeed_kernels.ops._dispatch import call

_INT32_MAX = 2**31 - 1  # sorted_indices is int32


def _is_int_tensor(t: object) -> bool:
    return isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _describe(t: object) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def moe_token_permute(
    tokens: torch.Tensor,
    indices: torch.Tensor,
    num_out_tokens: int | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group token copies by expert: ``(permuted_tokens, sorted_indices)``.

    ``tokens`` [T, H]; ``indices`` [T, K] (or [T] for K = 1) integer expert ids, top-k order.
    The T*K (token, slot) pairs are stably sorted by expert id; ``sorted_indices`` [T*K] int32
    gives, for each output row, the flat position ``t * K + k`` it came from, and
    ``permuted_tokens[r] = tokens[sorted_indices[r] // K]``. ``num_out_tokens`` (default T*K,
    0 <= num_out_tokens <= T*K) keeps only the first rows: give dropped slots an expert id larger
    than every real one so they sort last and are cut; ``sorted_indices`` always has all T*K
    entries. Returns [num_out_tokens, H] in ``tokens``' dtype. Differentiable in ``tokens``.
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise ValueError(f"moe_token_permute: tokens must be a [T, H] tensor, got {_describe(tokens)}")
    if not _is_int_tensor(indices) or indices.dim() not in (1, 2):
        raise TypeError(f"moe_token_permute: indices must be an integer [T, K] or [T] tensor, got {_describe(indices)}")
    if indices.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"moe_token_permute: indices.shape[0]={indices.shape[0]} must equal tokens.shape[0]={tokens.shape[0]} (T)"
        )
    if indices.dim() == 2 and indices.shape[1] == 0:
        raise ValueError("moe_token_permute: indices.shape[1]=0 (K) must be >= 1; every token needs a slot")
    if indices.device != tokens.device:
        raise ValueError(f"moe_token_permute: indices is on {indices.device} but tokens is on {tokens.device}")
    slots = indices.numel()
    if slots > _INT32_MAX:
        raise ValueError(f"moe_token_permute: T*K={slots} exceeds the int32 range of sorted_indices; split the batch")
    if num_out_tokens is not None and (
        isinstance(num_out_tokens, bool) or not isinstance(num_out_tokens, int) or not 0 <= num_out_tokens <= slots
    ):
        raise ValueError(f"moe_token_permute: num_out_tokens={num_out_tokens!r} must be None or an int in 0..{slots} (T*K)")
    return call("moe_token_permute", tokens, backend, tokens, indices, num_out_tokens)


def moe_token_unpermute(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    probs: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Inverse of :func:`moe_token_permute`, combining each token's K expert outputs.

    ``out[t] = sum_k probs[t, k] * permuted_tokens[pos(t * K + k)]`` where ``pos`` inverts
    ``sorted_indices``; slots cut by ``num_out_tokens`` (dropped, i.e. ``pos >= R``) contribute 0.
    ``permuted_tokens`` [R, H] with ``R <= T*K``; ``sorted_indices`` [T*K] from the permute (its
    values are trusted, not checked: checking would synchronise with the device); ``probs``
    [T, K] floating (K = probs.shape[1]; without probs K = 1 and weights are 1). Half-precision
    sums are accumulated in float32. Returns [T, H] in ``permuted_tokens``' dtype.
    Differentiable in ``permuted_tokens`` and ``probs``.
    """
    if not isinstance(permuted_tokens, torch.Tensor) or permuted_tokens.dim() != 2:
        raise ValueError(f"moe_token_unpermute: permuted_tokens must be an [R, H] tensor, got {_describe(permuted_tokens)}")
    if not _is_int_tensor(sorted_indices) or sorted_indices.dim() != 1:
        raise TypeError(f"moe_token_unpermute: sorted_indices must be a 1-D integer tensor, got {_describe(sorted_indices)}")
    slots = sorted_indices.numel()
    if probs is not None:
        if not isinstance(probs, torch.Tensor) or probs.dim() != 2 or not probs.is_floating_point():
            raise TypeError(f"moe_token_unpermute: probs must be a floating-point [T, K] tensor or None, got {_describe(probs)}")
        if probs.shape[1] == 0:
            raise ValueError(f"moe_token_unpermute: probs.shape={tuple(probs.shape)} has K=0 slots; K must be >= 1")
        if probs.numel() != slots:
            raise ValueError(
                f"moe_token_unpermute: probs.shape={tuple(probs.shape)} holds {probs.numel()} weights but "
                f"sorted_indices has {slots} (T*K) entries"
            )
        if probs.device != permuted_tokens.device:
            raise ValueError(f"moe_token_unpermute: probs is on {probs.device} but permuted_tokens on {permuted_tokens.device}")
    if permuted_tokens.shape[0] > slots:
        raise ValueError(
            f"moe_token_unpermute: permuted_tokens has {permuted_tokens.shape[0]} rows but sorted_indices only {slots} (T*K)"
        )
    if sorted_indices.device != permuted_tokens.device:
        raise ValueError(
            f"moe_token_unpermute: sorted_indices is on {sorted_indices.device} but permuted_tokens on {permuted_tokens.device}"
        )
    return call("moe_token_unpermute", permuted_tokens, backend, permuted_tokens, sorted_indices, probs)
