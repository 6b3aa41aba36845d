"""Splitting sequences across context-parallel ranks, and gathering them back.

Two layouts (see ``cp/__init__``):

- **zig-zag** (ring attention, ``megatron_cp_algo``): the global sequence is cut into
  ``2 * cp`` equal chunks; cp rank ``r`` holds chunks ``r`` and ``2 * cp - 1 - r``
  concatenated, so under a causal mask every rank has the same amount of work.
- **contiguous** (Ulysses): rank ``r`` holds chunk ``r`` of ``cp``.

Packed ``TND`` batches (``cu_seqlens``: cumulative end offsets of the sequences along dim 0)
are split *per sequence* in the same way, so every sequence length must divide by ``2 * cp``
(zig-zag) or ``cp`` (contiguous); each rank's local ``cu_seqlens`` is the global one / cp.

Gathers use ``all_gather`` on the caller's group and are not differentiable (they serve
loss/metric reassembly and tests). Sequences of any length are brought to those multiples with
:func:`pad_packed` (each sequence padded at its tail, so under a causal mask no real token sees a
pad token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "contiguous_gather",
    "contiguous_indices",
    "contiguous_split",
    "gather_packed",
    "pad_packed",
    "packed_indices",
    "padded_packed_rows",
    "split_packed",
    "zigzag_gather",
    "zigzag_indices",
    "zigzag_split",
]


def _check_cp(cp_size: int, cp_rank: int) -> None:
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size={cp_size!r} must be a positive int (the context-parallel world size)")
    if not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank!r} must be an int in [0, cp_size={cp_size})")


def _check_len(name: str, length: int, parts: int, what: str) -> int:
    if length % parts:
        pad = -length % parts
        raise ValueError(f"{name} has length {length}, not divisible by {what} = {parts}; pad it by {pad} tokens")
    return length // parts


def zigzag_indices(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions held by ``cp_rank`` under the zig-zag split: int64 [seq_len // cp_size].

    ``seq_len`` must divide by ``2 * cp_size``. These are also the rank's position ids.
    """
    _check_cp(cp_size, cp_rank)
    chunk = _check_len("the sequence", seq_len, 2 * cp_size, "2 * cp_size")
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk, device=device)
    return torch.cat([first, second])


def contiguous_indices(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions held by ``cp_rank`` under the contiguous split: int64 [seq_len // cp_size]."""
    _check_cp(cp_size, cp_rank)
    chunk = _check_len("the sequence", seq_len, cp_size, "cp_size")
    return torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)


def _seq_dim(x: torch.Tensor, seq_dim: int) -> int:
    if not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"seq_dim={seq_dim} is out of range for a {x.dim()}-d tensor")
    return seq_dim % x.dim()


def zigzag_split(x: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int) -> torch.Tensor:
    """This rank's zig-zag part of ``x`` along ``seq_dim``: chunks ``r`` and ``2cp-1-r`` of ``2cp``.

    ``x`` [..., S, ...] -> [..., S // cp_size, ...] (a copy; ``S`` must divide by ``2 * cp_size``).
    """
    dim = _seq_dim(x, seq_dim)
    _check_cp(cp_size, cp_rank)
    _check_len(f"x's dim {dim}", x.shape[dim], 2 * cp_size, "2 * cp_size")
    chunks = x.chunk(2 * cp_size, dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim)


def contiguous_split(x: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int) -> torch.Tensor:
    """This rank's contiguous part of ``x`` along ``seq_dim``: chunk ``r`` of ``cp`` (a view).

    ``x`` [..., S, ...] -> [..., S // cp_size, ...] (``S`` must divide by ``cp_size``).
    """
    dim = _seq_dim(x, seq_dim)
    _check_cp(cp_size, cp_rank)
    chunk = _check_len(f"x's dim {dim}", x.shape[dim], cp_size, "cp_size")
    return x.narrow(dim, cp_rank * chunk, chunk)


def _all_gather(local: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return parts


def zigzag_gather(local: torch.Tensor, group, seq_dim: int) -> torch.Tensor:
    """Inverse of :func:`zigzag_split` over ``group``: [..., S // cp, ...] on every rank -> [..., S, ...].

    Collective: every rank of ``group`` calls it with the same local shape.
    """
    dim = _seq_dim(local, seq_dim)
    _check_len(f"local's dim {dim}", local.shape[dim], 2, "2 (two zig-zag chunks)")
    halves = [p.chunk(2, dim) for p in _all_gather(local, group)]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


def contiguous_gather(local: torch.Tensor, group, seq_dim: int) -> torch.Tensor:
    """Inverse of :func:`contiguous_split` over ``group``: [..., S // cp, ...] -> [..., S, ...]."""
    dim = _seq_dim(local, seq_dim)
    return torch.cat(_all_gather(local, group), dim)


def _lengths(cu_seqlens: Sequence[int] | torch.Tensor, name: str = "cu_seqlens") -> list[int]:
    """Sequence lengths from cumulative end offsets (strictly increasing, first > 0)."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise TypeError(
                f"{name} must be a 1-d integer tensor or a list of ints, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        cu_seqlens = cu_seqlens.tolist()
    ends = [int(e) for e in cu_seqlens]
    if not ends:
        raise ValueError(f"{name} is empty; pass the cumulative end offsets of the packed sequences, e.g. [3, 8]")
    lengths = [b - a for a, b in zip([0] + ends[:-1], ends, strict=True)]
    if min(lengths) <= 0:
        raise ValueError(
            f"{name}={ends} must be strictly increasing and start above 0 (cumulative end offsets, no empty sequence)"
        )
    return lengths


def packed_indices(cu_seqlens, cp_size: int, cp_rank: int, zigzag: bool, device=None) -> tuple[torch.Tensor, list[int]]:
    """Rows of a packed batch held by ``cp_rank``, and the local cumulative ends.

    ``cu_seqlens``: global cumulative end offsets [n] (list or 1-d int tensor). Each sequence is
    split on its own (zig-zag or contiguous), so every length must divide by ``2 * cp_size``
    (zig-zag) or ``cp_size``. Returns ``(rows int64 [T // cp_size], local_cu_seqlens list[int])``.
    """
    _check_cp(cp_size, cp_rank)
    parts = []
    start = 0
    for j, length in enumerate(_lengths(cu_seqlens)):
        if zigzag:
            _check_len(f"cu_seqlens: sequence {j}", length, 2 * cp_size, "2 * cp_size")
            parts.append(start + zigzag_indices(length, cp_size, cp_rank, device))
        else:
            _check_len(f"cu_seqlens: sequence {j}", length, cp_size, "cp_size")
            parts.append(start + contiguous_indices(length, cp_size, cp_rank, device))
        start += length
    local_cu = torch.tensor([len(p) for p in parts]).cumsum(0).tolist()
    return torch.cat(parts), local_cu


def split_packed(x: torch.Tensor, cu_seqlens, cp_size: int, cp_rank: int, zigzag: bool):
    """This rank's part of a packed batch ``x`` [T, ...] (dim 0 is the token axis).

    Returns ``(local_x [T // cp_size, ...], local_cu_seqlens)``; ``local_cu_seqlens`` is the
    global one divided by ``cp_size``, as a list when ``cu_seqlens`` is a list, else a tensor of
    its dtype and device.
    """
    total = sum(_lengths(cu_seqlens))
    if total != x.shape[0]:
        raise ValueError(f"cu_seqlens ends at {total} but x has {x.shape[0]} tokens along dim 0; they must match")
    rows, local_cu = packed_indices(cu_seqlens, cp_size, cp_rank, zigzag, device=x.device)
    local_x = x.index_select(0, rows)
    if isinstance(cu_seqlens, torch.Tensor):
        return local_x, torch.tensor(local_cu, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    return local_x, local_cu


def gather_packed(local_x: torch.Tensor, cu_seqlens_global, group, zigzag: bool) -> torch.Tensor:
    """Inverse of :func:`split_packed` over ``group``: [T // cp, ...] on every rank -> [T, ...]."""
    cp = dist.get_world_size(group)
    total = sum(_lengths(cu_seqlens_global, "cu_seqlens_global"))
    if local_x.shape[0] * cp != total:
        raise ValueError(f"local_x has {local_x.shape[0]} tokens but cu_seqlens_global ends at {total} (= {cp} ranks x local)")
    out = local_x.new_empty((total, *local_x.shape[1:]))
    for rank, part in enumerate(_all_gather(local_x, group)):
        rows, _ = packed_indices(cu_seqlens_global, cp, rank, zigzag, device=local_x.device)
        out.index_copy_(0, rows, part)
    return out


def padded_packed_rows(cu_seqlens, multiple: int, device=None) -> tuple[torch.Tensor, list[int]]:
    """Where the tokens of a packed batch go when every sequence is padded at its tail to a
    multiple of ``multiple`` tokens.

    ``cu_seqlens``: cumulative end offsets [n] of the unpadded sequences (list or 1-d int tensor;
    a leading 0 is allowed). Returns ``(rows int64 [T], padded_cu list[int])``: the row of each
    original token in the padded batch, and the padded batch's cumulative ends (without 0).
    """
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple={multiple!r} must be a positive int (2 * cp for zig-zag, cp for contiguous)")
    lengths = _lengths(_drop_leading_zero(cu_seqlens))
    padded = [-(-length // multiple) * multiple for length in lengths]
    starts = torch.tensor([0] + padded[:-1], dtype=torch.int64).cumsum(0)
    # token t of sequence j sits at padded start(j) + (t - start(j)): shift each sequence by the padding before it
    shift = starts - torch.tensor([0] + lengths[:-1], dtype=torch.int64).cumsum(0)
    rows = torch.arange(sum(lengths), dtype=torch.int64) + torch.repeat_interleave(shift, torch.tensor(lengths))
    return rows.to(device), torch.tensor(padded).cumsum(0).tolist()


def pad_packed(x: torch.Tensor, cu_seqlens, multiple: int, value=0) -> tuple[torch.Tensor, list[int]]:
    """``x`` [T, ...] (dim 0 the packed token axis) with every sequence padded at its tail with
    ``value`` to a multiple of ``multiple`` tokens: ``(padded_x [T', ...], padded_cu list[int])``
    (cumulative ends without the leading 0), ready for :func:`split_packed`."""
    rows, padded_cu = padded_packed_rows(cu_seqlens, multiple, device=x.device)
    if rows.numel() != x.shape[0]:
        raise ValueError(f"cu_seqlens ends at {rows.numel()} but x has {x.shape[0]} tokens along dim 0; they must match")
    out = x.new_full((padded_cu[-1], *x.shape[1:]), value)
    out.index_copy_(0, rows, x)
    return out, padded_cu


def _drop_leading_zero(cu_seqlens):
    """megatron's ``cu_seqlens`` start with 0; this module's cumulative ends do not."""
    ends = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 else cu_seqlens
    if isinstance(ends, (list, tuple)) and len(ends) > 1 and int(ends[0]) == 0:
        return list(ends[1:])
    return cu_seqlens
