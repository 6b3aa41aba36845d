"""Layout plumbing for the naive attention formulas in the tests, written independently of
``mindspeed_kernels._layouts`` (so a bug there cannot hide in both)."""

from __future__ import annotations

import math

import torch


def layout_shape(layout, b, n, s, d):
    """The tensor shape of [B, N, S, D] data in ``layout`` (TND: B = 1, T = S)."""
    return {"BNSD": (b, n, s, d), "BSND": (b, s, n, d), "BSH": (b, s, n * d), "SBH": (s, b, n * d), "TND": (s, n, d)}[layout]


def to_bnsd(x, layout, n):
    """[B, N, S, D] copy-or-view of ``x`` given in ``layout`` with ``n`` heads (not TND)."""
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.permute(0, 2, 1, 3)
    if layout == "BSH":
        return x.reshape(x.shape[0], x.shape[1], n, -1).permute(0, 2, 1, 3)
    return x.reshape(x.shape[0], x.shape[1], n, -1).permute(1, 2, 0, 3)  # SBH


def from_bnsd(x, layout):
    """Inverse of :func:`to_bnsd`."""
    b, n, s, d = x.shape
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.permute(0, 2, 1, 3)
    if layout == "BSH":
        return x.permute(0, 2, 1, 3).reshape(b, s, n * d)
    return x.permute(2, 0, 1, 3).reshape(s, b, n * d)  # SBH


def naive_attention(q, k, v, layout, n_q, n_kv, causal, scale):
    """softmax(scale q k^T) v as full matrices: out in ``layout`` and lse [B, Nq, Sq]. GQA repeats
    each kv head for ``n_q // n_kv`` query heads; ``causal`` is top-left (use with Sq == Skv)."""
    q4, k4, v4 = to_bnsd(q, layout, n_q), to_bnsd(k, layout, n_kv), to_bnsd(v, layout, n_kv)
    k4, v4 = k4.repeat_interleave(n_q // n_kv, 1), v4.repeat_interleave(n_q // n_kv, 1)
    s = scale * q4 @ k4.transpose(-1, -2)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), -math.inf)
    return from_bnsd(torch.softmax(s, -1) @ v4, layout), torch.logsumexp(s, -1)
