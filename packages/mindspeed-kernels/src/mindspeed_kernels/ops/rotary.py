"""Rotary position embedding application (torch_npu ``npu_rotary_mul``)."""

from __future__ import annotations

import torch

from mindspeed_kernels.ops._dispatch import call


def _check_tensors(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 1:
            got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"rotary_pos_emb: {name} must be a floating-point tensor with at least 1 dimension, got {got}")
        if t.device != x.device:
            raise ValueError(f"rotary_pos_emb: {name} is on {t.device} but x is on {x.device}; move them to one device")


def _broadcasts_into(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without enlarging it (torch.broadcast_shapes
    goes through torch._refs and costs ~70 us a call: this runs for q and k in every layer)."""
    return len(shape) <= len(target) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target), strict=False))


def rotary_pos_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Rotate ``x``'s first ``R = cos.shape[-1]`` channels; channels ``R:`` pass through unchanged.

    ``out[..., :R] = x_r * cos + rotate(x_r) * sin`` with ``x_r = x[..., :R]`` and
    ``rotate`` = rotate-half (``cat(-x2, x1)`` over the two halves; ``cos`` laid out as
    ``cat(freqs, freqs)``) or, with ``interleaved``, the pairwise rotation of channels
    ``(2i, 2i+1)`` (``(x[2i], x[2i+1]) -> (-x[2i+1], x[2i])``; ``cos`` laid out as
    ``repeat_interleave(freqs, 2)``). :func:`mindspeed_kernels.rope.rope_cos_sin` builds both layouts.

    Partial rotary (``R < D``, e.g. Megatron's ``rotary_percent``; for MLA pass the rope slice of
    the head) needs no extra argument. Shapes: ``x`` [..., D]; ``cos``/``sin`` [..., R] (same
    shape), R even with ``0 < R <= D``, broadcastable to ``x[..., :R]`` without enlarging it
    (e.g. [S, 1, 1, R] for an [S, B, N, D] ``x``). Returns ``x``'s shape and dtype; the product is computed
    in float32 for half-precision inputs. Differentiable in ``x`` (and in ``cos``/``sin`` when
    they require grad).
    """
    _check_tensors(x, cos, sin)
    if cos.shape != sin.shape:
        raise ValueError(f"rotary_pos_emb: cos.shape={tuple(cos.shape)} and sin.shape={tuple(sin.shape)} must be equal")
    rot, head = cos.shape[-1], x.shape[-1]
    if rot == 0 or rot % 2 or rot > head:
        raise ValueError(
            f"rotary_pos_emb: cos.shape[-1]={rot} (rotary dim) must be even and in 2..{head} (x.shape[-1]); "
            f"check how cos/sin were built"
        )
    target = (*x.shape[:-1], rot)
    if not _broadcasts_into(tuple(cos.shape), target):
        raise ValueError(
            f"rotary_pos_emb: cos/sin of shape {tuple(cos.shape)} do not broadcast to x[..., :{rot}] of shape {target}; "
            f"insert size-1 dimensions (e.g. [S, 1, 1, R] for [S, B, N, D])"
        )
    if not isinstance(interleaved, bool):
        raise TypeError(f"rotary_pos_emb: interleaved={interleaved!r} must be True or False")
    return call("rotary_pos_emb", x, backend, x, cos, sin, interleaved)
