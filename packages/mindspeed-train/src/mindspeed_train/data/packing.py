"""Packing fine-tuning samples into sequences of at most ``seq_length`` tokens.

Format of a packed sequence (one document in each of the three indexed datasets):

* ``input_ids``: the samples' tokens back to back, no padding (the trainer pads);
* ``labels``: the samples' labels back to back (``-100`` = no loss);
* ``attention_mask``: with ``--neat-pack``, the 1-based index of the sample each token belongs
  to (1,1,1,2,2,3,...); plain ``--pack`` writes all ones (samples may attend to each other).
  ``0`` is reserved for padding added later.

The trainer turns the neat-pack mask into ``cu_seqlens`` with :func:`cu_seqlens_from_segments`
and feeds them to the attention kernel (TND layout, ``actual_seq_qlen/kvlen``), so attention
never crosses a sample boundary.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


def plan_packs(lengths: Sequence[int], seq_length: int) -> list[list[int]]:
    """Group sample indices into packs of total length <= ``seq_length``.

    Best-fit decreasing: longest samples first, each into the fullest pack that still has room.
    Deterministic (ties keep input order); samples inside a pack are listed in input order.
    Raises ValueError when a sample is longer than ``seq_length`` (truncate or drop it first).
    """
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length} must be >= 1 for packing; pass --seq-length")
    too_long = [i for i, n in enumerate(lengths) if n > seq_length]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens > seq_length={seq_length}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, pack id), sorted: bisect finds the tightest fit
    for i in order:
        pos = bisect.bisect_left(free, (lengths[i], -1))
        if pos == len(free):
            packs.append([i])
            room, pid = seq_length - lengths[i], len(packs) - 1
        else:
            room, pid = free.pop(pos)
            packs[pid].append(i)
            room -= lengths[i]
        bisect.insort(free, (room, pid))
    return [sorted(p) for p in sorted(packs, key=min)]


def segment_ids(lengths: Sequence[int]) -> np.ndarray:
    """1-based sample index per token for samples of ``lengths`` packed back to back."""
    return np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), np.asarray(lengths, dtype=np.int64))


def cu_seqlens_from_segments(segments: np.ndarray | Sequence[int]) -> np.ndarray:
    """Cumulative sample boundaries ``[0, n1, n1+n2, ...]`` (int32) from a neat-pack mask.

    ``segments`` is the 1-D attention_mask of one packed sequence; trailing zeros (padding)
    are left out of the last boundary.
    """
    seg = np.asarray(segments)
    if seg.ndim != 1:
        raise ValueError(f"segments must be 1-D, got shape {seg.shape}")
    valid = int(np.count_nonzero(seg))
    body = seg[:valid]
    if valid and (body[0] != 1 or np.any(np.diff(body) < 0) or np.any(np.diff(body) > 1)):
        raise ValueError("segments must be 1,1,..,2,2,..,k then zero padding (a neat-pack attention_mask)")
    starts = np.flatnonzero(np.diff(body)) + 1
    return np.concatenate([[0], starts, [valid]]).astype(np.int32) if valid else np.zeros(1, dtype=np.int32)


def block_causal_mask(segments: np.ndarray | Sequence[int]) -> np.ndarray:
    """Boolean [S, S] mask, True where query i may attend key j: same sample and j <= i."""
    seg = np.asarray(segments)
    same = (seg[:, None] == seg[None, :]) & (seg[:, None] > 0)
    return same & np.tri(len(seg), dtype=bool)
