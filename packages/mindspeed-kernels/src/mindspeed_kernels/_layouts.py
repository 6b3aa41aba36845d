"""Views between flash_attention's tensor layouts, shared by every backend.

``SBH`` [S, B, H], ``BSH`` [B, S, H], ``BSND`` [B, S, N, D], ``BNSD`` [B, N, S, D], ``TND`` [T, N, D].
All functions return views (no copies) where torch allows.
"""

from __future__ import annotations

import torch


def heads(x: torch.Tensor, layout: str, n: int) -> torch.Tensor:
    """``x`` with an explicit head axis: SBH/BSH split H into [n, D]; other layouts unchanged."""
    return x.unflatten(-1, (n, -1)) if layout in ("SBH", "BSH") else x


def to_bnsd(x: torch.Tensor, layout: str, n: int) -> torch.Tensor:
    """A [B, N, S, D] view of ``x`` (TND: of a [s, N, D] slice, as B=1)."""
    if layout == "TND":
        return x.transpose(0, 1).unsqueeze(0)
    x = heads(x, layout, n)
    if layout == "SBH":
        return x.permute(1, 2, 0, 3)
    return x if layout == "BNSD" else x.transpose(1, 2)


def from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`to_bnsd` for one [B, N, S, D] tensor (TND: B must be 1)."""
    if layout == "TND":
        return x.squeeze(0).transpose(0, 1)
    if layout == "BNSD":
        return x
    x = x.permute(2, 0, 1, 3) if layout == "SBH" else x.transpose(1, 2)
    return x.flatten(-2) if layout in ("SBH", "BSH") else x


def lse_like_heads(lse: torch.Tensor, layout: str) -> torch.Tensor:
    """An lse-shaped tensor ([B, N, S]; TND [T, N]) arranged to broadcast against :func:`heads` of an output."""
    if layout in ("TND", "BNSD"):
        return lse.unsqueeze(-1)
    if layout == "SBH":
        return lse.permute(2, 0, 1).unsqueeze(-1)  # [S, B, N, 1]
    return lse.transpose(1, 2).unsqueeze(-1)  # BSH / BSND: [B, S, N, 1]


def lse_bns(lse: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, N, S] view of an lse-shaped tensor (TND: of a [s, N] slice, as B=1)."""
    return lse.transpose(0, 1).unsqueeze(0) if layout == "TND" else lse
