"""Layout plumbing for the naive attention formulas in the tests, written independently of
``mindspeed_kernels._layouts`` (so a bug there cannot hide in both)."""

from __future__ import annotations


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
