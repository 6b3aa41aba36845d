"""Hybrid context parallelism (``context_parallel_algo='hybrid_cp_algo'``): Ulysses x ring.

A CP group of ``cp = u * R`` ranks is factored into ``R`` Ulysses groups of ``u`` consecutive
ranks and ``u`` ring groups of stride ``u`` (Ulysses moves the most data, so its ranks are kept
adjacent, i.e. on one node, as MindSpeed does):

    cp_rank = ring_rank * u + ulysses_rank

Data layout: the global sequence is zig-zag split over the ring degree ``R`` (ring rank ``r``
holds chunks ``r`` and ``2R-1-r`` of ``2R``), then each ring rank's local sequence is split
contiguously over the Ulysses degree ``u``. Packed TND batches are split the same way per
sequence. Attention: Ulysses all-to-all over the Ulysses group (sequence -> heads), then ring
attention over the ring group on the ring-local sequence, then the reverse all-to-all.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.distributed as dist

from mindspeed_parallel.cp.data import contiguous_indices, packed_indices, zigzag_indices
from mindspeed_parallel.cp.ring import ring_attention
from mindspeed_parallel.cp.ulysses import ulysses_attention

__all__ = [
    "hybrid_attention",
    "hybrid_gather",
    "hybrid_gather_packed",
    "hybrid_indices",
    "hybrid_packed_indices",
    "hybrid_split",
    "hybrid_split_packed",
    "make_hybrid_groups",
]


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ulysses_group: dist.ProcessGroup,
    ring_group: dist.ProcessGroup,
    causal: bool = True,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    kv_head_repeat: bool = True,
    cu_seqlens: Sequence[int] | torch.Tensor | None = None,
    window_size: int = 1,
    inner_group: dist.ProcessGroup | None = None,
    outer_group: dist.ProcessGroup | None = None,
    send_recv_overlap: bool = False,
) -> torch.Tensor:
    """Attention over a sequence split by `hybrid_split` across ``u * R`` ranks.

    q [S/(u*R), B, Nq, D], k/v [S/(u*R), B, Nkv, D|Dv] (SBND), or packed TND [T/(u*R), N, D]
    with ``cu_seqlens`` the local cumulative ends (global / (u*R), see `hybrid_split_packed`).
    ``ulysses_group`` / ``ring_group`` come from `make_hybrid_groups`. Nq must divide by ``u``;
    Nkv too, or ``kv_head_repeat`` (kv_head_repeat_before_uly_alltoall) repeats kv heads first.
    Mask options (``causal``, general ``attention_mask`` in global coordinates, ``scale``) and
    the ring options (``window_size`` = cp_window_size with its ``inner_group``/``outer_group``,
    ``send_recv_overlap``) are passed to `mindspeed_parallel.cp.ring.ring_attention`.
    Returns out [S/(u*R), B, Nq, Dv] (TND [T/(u*R), Nq, Dv]) in q's dtype; differentiable.
    """
    if ulysses_group is None or ring_group is None:
        raise ValueError("ulysses_group, ring_group: both are required; create them with make_hybrid_groups(cp_ranks, u)")
    attn_fn = functools.partial(
        ring_attention,
        group=ring_group,
        causal=causal,
        attention_mask=attention_mask,
        scale=scale,
        window_size=window_size,
        inner_group=inner_group,
        outer_group=outer_group,
        send_recv_overlap=send_recv_overlap,
    )
    return ulysses_attention(q, k, v, ulysses_group, attn_fn=attn_fn, kv_head_repeat=kv_head_repeat, cu_seqlens=cu_seqlens)


def make_hybrid_groups(cp_ranks: Sequence[int], ulysses_degree: int, **new_group_kwargs):
    """Create the Ulysses and ring groups of one CP group; return this rank's ``(ulysses_group, ring_group)``.

    Collective over the default group: every process calls it with the same arguments (for
    several CP groups, call it once per CP group in the same order everywhere and keep the
    result of the one holding this rank). ``cp_ranks`` are global ranks, taken in ascending
    order (torch numbers a group's ranks that way); ``cp_rank`` is the index in that order.
    Ulysses groups: ``cp_ranks[m*u:(m+1)*u]``; ring groups: ``cp_ranks[j::u]``. A process
    outside ``cp_ranks`` gets ``(None, None)``. ``new_group_kwargs`` go to ``dist.new_group``.
    """
    ranks = sorted(int(r) for r in cp_ranks)
    if len(set(ranks)) != len(ranks) or not ranks:
        raise ValueError(f"cp_ranks={list(cp_ranks)} must be a non-empty list of distinct global ranks")
    if not isinstance(ulysses_degree, int) or ulysses_degree < 1 or len(ranks) % ulysses_degree:
        raise ValueError(
            f"ulysses_degree={ulysses_degree!r} must be a positive int dividing the CP size {len(ranks)} "
            "(ulysses_degree_in_cp must divide context_parallel_size)"
        )
    me = dist.get_rank()
    ulysses_group = ring_group = None
    for start in range(0, len(ranks), ulysses_degree):
        members = ranks[start : start + ulysses_degree]
        group = dist.new_group(members, **new_group_kwargs)
        if me in members:
            ulysses_group = group
    for offset in range(ulysses_degree):
        members = ranks[offset::ulysses_degree]
        group = dist.new_group(members, **new_group_kwargs)
        if me in members:
            ring_group = group
    return ulysses_group, ring_group


def _ranks(ulysses_degree: int, ring_degree: int, cp_rank: int) -> tuple[int, int]:
    for name, value in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if not isinstance(cp_rank, int) or not 0 <= cp_rank < ulysses_degree * ring_degree:
        raise ValueError(
            f"cp_rank={cp_rank!r} must be an int in [0, ulysses_degree * ring_degree = {ulysses_degree * ring_degree})"
        )
    ring_rank, ulysses_rank = divmod(cp_rank, ulysses_degree)
    return ring_rank, ulysses_rank


def hybrid_indices(seq_len: int, ulysses_degree: int, ring_degree: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions held by ``cp_rank`` under the hybrid split: int64 [seq_len // (u * R)].

    ``seq_len`` must divide by ``2 * R`` and the ring-local length ``seq_len / R`` by ``u``.
    These are also the rank's position ids (for RoPE).
    """
    ring_rank, ulysses_rank = _ranks(ulysses_degree, ring_degree, cp_rank)
    ring_rows = zigzag_indices(seq_len, ring_degree, ring_rank, device)
    return ring_rows[contiguous_indices(ring_rows.numel(), ulysses_degree, ulysses_rank, device)]


def hybrid_packed_indices(cu_seqlens, ulysses_degree: int, ring_degree: int, cp_rank: int, device=None):
    """Rows of a packed batch held by ``cp_rank``, and its local cumulative ends.

    Each sequence is zig-zag split over ``R`` and its ring-local part contiguously over ``u``,
    so every length must divide by ``2 * R`` and by ``R * u``. Returns ``(rows int64
    [T // (u * R)], local_cu_seqlens list[int])`` (the local ends are the global ones / (u * R)).
    """
    ring_rank, ulysses_rank = _ranks(ulysses_degree, ring_degree, cp_rank)
    ring_rows, ring_cu = packed_indices(cu_seqlens, ring_degree, ring_rank, zigzag=True, device=device)
    rows, local_cu = packed_indices(ring_cu, ulysses_degree, ulysses_rank, zigzag=False, device=device)
    return ring_rows[rows], local_cu


def hybrid_split(x: torch.Tensor, ulysses_degree: int, ring_degree: int, cp_rank: int, seq_dim: int) -> torch.Tensor:
    """This rank's hybrid part of ``x`` along ``seq_dim``: [..., S, ...] -> [..., S // (u * R), ...] (a copy)."""
    dim = _dim(x, seq_dim)
    rows = hybrid_indices(x.shape[dim], ulysses_degree, ring_degree, cp_rank, device=x.device)
    return x.index_select(dim, rows)


def hybrid_split_packed(x: torch.Tensor, cu_seqlens, ulysses_degree: int, ring_degree: int, cp_rank: int):
    """This rank's hybrid part of a packed batch ``x`` [T, ...]: ``(local_x [T // (u*R), ...], local_cu_seqlens)``.

    ``local_cu_seqlens`` is a list when ``cu_seqlens`` is a list, else a tensor of its dtype and device.
    """
    rows, local_cu = hybrid_packed_indices(cu_seqlens, ulysses_degree, ring_degree, cp_rank, device=x.device)
    if rows.numel() * ulysses_degree * ring_degree != x.shape[0]:
        raise ValueError(
            f"cu_seqlens ends at {rows.numel() * ulysses_degree * ring_degree} but x has {x.shape[0]} tokens; they must match"
        )
    if isinstance(cu_seqlens, torch.Tensor):
        local_cu = torch.tensor(local_cu, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return x.index_select(0, rows), local_cu


def hybrid_gather(local: torch.Tensor, cp_group: dist.ProcessGroup, ulysses_degree: int, seq_dim: int) -> torch.Tensor:
    """Inverse of `hybrid_split` over the whole CP group: [..., S // cp, ...] on every rank -> [..., S, ...].

    Collective over ``cp_group`` (ranks numbered as in `make_hybrid_groups`); not differentiable.
    """
    dim = _dim(local, seq_dim)
    cp = _cp_size(cp_group, ulysses_degree)
    parts = _all_gather(local, cp_group)
    seq_len = local.shape[dim] * cp
    out = local.new_empty((*local.shape[:dim], seq_len, *local.shape[dim + 1 :]))
    for rank, part in enumerate(parts):
        out.index_copy_(dim, hybrid_indices(seq_len, ulysses_degree, cp // ulysses_degree, rank, local.device), part)
    return out


def hybrid_gather_packed(
    local: torch.Tensor, cu_seqlens_global, cp_group: dist.ProcessGroup, ulysses_degree: int
) -> torch.Tensor:
    """Inverse of `hybrid_split_packed` over the CP group: [T // cp, ...] on every rank -> [T, ...]."""
    cp = _cp_size(cp_group, ulysses_degree)
    parts = _all_gather(local, cp_group)
    out = local.new_empty((local.shape[0] * cp, *local.shape[1:]))
    for rank, part in enumerate(parts):
        rows, _ = hybrid_packed_indices(cu_seqlens_global, ulysses_degree, cp // ulysses_degree, rank, local.device)
        if rows.numel() != part.shape[0]:
            raise ValueError(
                f"cu_seqlens_global ends at {rows.numel() * cp} but the ranks hold {out.shape[0]} tokens; they must match"
            )
        out.index_copy_(0, rows, part)
    return out


def _cp_size(cp_group: dist.ProcessGroup, ulysses_degree: int) -> int:
    cp = dist.get_world_size(cp_group)
    if not isinstance(ulysses_degree, int) or ulysses_degree < 1 or cp % ulysses_degree:
        raise ValueError(f"ulysses_degree={ulysses_degree!r} must be a positive int dividing the CP group size {cp}")
    return cp


def _dim(x: torch.Tensor, seq_dim: int) -> int:
    if not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"seq_dim={seq_dim} is out of range for a {x.dim()}-d tensor")
    return seq_dim % x.dim()


def _all_gather(local: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return parts
