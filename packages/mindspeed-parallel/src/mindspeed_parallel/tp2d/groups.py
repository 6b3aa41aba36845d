"""The tp_x x tp_y grid of a tensor-parallel group and the process groups along its two axes.

A tensor-parallel group of ``tp = tp_x * tp_y`` ranks (listed in ``tp_ranks``) is laid out with
the x axis fastest, as MindSpeed lays out its ``nd1_dim1`` (= TP-X) and ``nd1_dim2`` (= TP-Y)
groups::

    index i of tp_ranks  ->  x = i % tp_x,  y = i // tp_x

    tp_x=2, tp_y=2, tp_ranks=[0, 1, 2, 3]:   x groups [0, 1] [2, 3]   (consecutive ranks)
                                             y groups [0, 2] [1, 3]   (stride tp_x)

so an x group holds ``tp_x`` neighbouring ranks (usually one node's fast links). NDMM uses the
same grid with ``tp_x = nd1-dim1-size`` (see `mindspeed_parallel.ndmm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["Grid2D", "TP2DGroups", "make_tp2d_groups"]


@dataclass(frozen=True)
class Grid2D:
    """Pure arithmetic of a ``tp_x x tp_y`` grid over ``tp_ranks`` (no process groups)."""

    tp_ranks: tuple[int, ...]
    tp_x: int
    tp_y: int

    def __post_init__(self) -> None:
        if self.tp_x < 1 or self.tp_y < 1:
            raise ValueError(f"tp_x={self.tp_x} and tp_y={self.tp_y} must both be >= 1")
        if self.tp_x * self.tp_y != len(self.tp_ranks):
            raise ValueError(
                f"tp_x * tp_y = {self.tp_x} * {self.tp_y} must equal the tensor-parallel size {len(self.tp_ranks)}; "
                "choose tp_x and tp_y whose product is the TP size"
            )
        if len(set(self.tp_ranks)) != len(self.tp_ranks):
            raise ValueError(f"tp_ranks={list(self.tp_ranks)} lists a rank twice; pass each rank once")

    def coords(self, rank: int) -> tuple[int, int]:
        """``(x, y)`` of global ``rank`` in the grid."""
        if rank not in self.tp_ranks:
            raise ValueError(f"rank {rank} is not in tp_ranks={list(self.tp_ranks)}; pass this rank's TP group")
        index = self.tp_ranks.index(rank)
        return index % self.tp_x, index // self.tp_x

    def x_group_ranks(self, y: int) -> tuple[int, ...]:
        """Global ranks of the x group (size tp_x) in row ``y``, ordered by x."""
        return self.tp_ranks[y * self.tp_x : (y + 1) * self.tp_x]

    def y_group_ranks(self, x: int) -> tuple[int, ...]:
        """Global ranks of the y group (size tp_y) in column ``x``, ordered by y."""
        return self.tp_ranks[x :: self.tp_x]


@dataclass(frozen=True)
class TP2DGroups:
    """This rank's place in the grid: its x and y process groups and coordinates.

    ``x == dist.get_rank(x_group)`` and ``y == dist.get_rank(y_group)``.
    """

    grid: Grid2D
    x_group: dist.ProcessGroup
    y_group: dist.ProcessGroup
    x: int
    y: int

    @property
    def tp_x(self) -> int:
        return self.grid.tp_x

    @property
    def tp_y(self) -> int:
        return self.grid.tp_y


def make_tp2d_groups(tp_ranks: Sequence[int], tp_x: int, tp_y: int) -> TP2DGroups:
    """Create this rank's x and y groups of the ``tp_x x tp_y`` grid over ``tp_ranks``.

    Collective over ``tp_ranks`` only: every rank of this TP group must call it (with the same
    arguments), ranks of other TP groups need not, because the groups are created with local
    synchronisation (so, as for any locally synchronised ``new_group``, the members must have
    created the same number of process groups before this call). The default process group must
    be initialised.
    """
    grid = Grid2D(tuple(int(r) for r in tp_ranks), int(tp_x), int(tp_y))
    if not dist.is_initialized():
        raise ValueError("make_tp2d_groups: torch.distributed is not initialised; call init_process_group first")
    x, y = grid.coords(dist.get_rank())
    # Local synchronisation: only members take part, so TP groups of a larger world need not
    # create each other's groups in lock-step. x group first, then y group, on every member.
    x_group = dist.new_group(list(grid.x_group_ranks(y)), use_local_synchronization=True)
    y_group = dist.new_group(list(grid.y_group_ranks(x)), use_local_synchronization=True)
    return TP2DGroups(grid=grid, x_group=x_group, y_group=y_group, x=x, y=y)
