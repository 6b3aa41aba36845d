"""Who holds which K/V block at each ring step, and the point-to-point moves between steps.

Ranks of the cp group are numbered ``r = W * w + j`` (window ``W``, position ``j`` inside it,
window size ``w``). A *single* ring is the case ``w = cp`` (one window). In the *double* ring
(``cp_window_size = w > 1``) K/V first travels ``w - 1`` hops around its window (the inner
ring, typically fast intra-node links), then one hop to the same position of the next window
(the outer ring), and so on: ``cp`` steps in all, each rank seeing every block exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RingSchedule:
    """``held[t][r]``: the cp rank whose K/V block rank ``r`` holds at step ``t``;
    ``moves[t]``: ``"inner"`` or ``"outer"``, the hop taken between steps ``t`` and ``t + 1``."""

    cp: int
    window: int
    held: tuple[tuple[int, ...], ...]
    moves: tuple[str, ...]

    def prev(self, rank: int, move: str) -> int:
        """The cp rank ``rank`` receives from on ``move``."""
        win, j = divmod(rank, self.window)
        if move == "inner":
            return win * self.window + (j - 1) % self.window
        return ((win - 1) % (self.cp // self.window)) * self.window + j

    def next(self, rank: int, move: str) -> int:
        """The cp rank ``rank`` sends to on ``move``."""
        win, j = divmod(rank, self.window)
        if move == "inner":
            return win * self.window + (j + 1) % self.window
        return ((win + 1) % (self.cp // self.window)) * self.window + j


def ring_schedule(cp: int, window: int) -> RingSchedule:
    """Simulate the (double) ring for ``cp`` ranks and windows of ``window`` ranks (dividing cp)."""
    moves = []
    for _ in range(cp // window):
        moves += ["inner"] * (window - 1) + ["outer"]
    moves = moves[: cp - 1]  # no hop after the last step
    proto = RingSchedule(cp, window, (), ())
    held = [tuple(range(cp))]
    for move in moves:
        held.append(tuple(held[-1][proto.prev(r, move)] for r in range(cp)))
    return RingSchedule(cp, window, tuple(held), tuple(moves))


class _Pending:
    """Posted sends/receives; ``wait()`` returns the received tensors."""

    def __init__(self, works, received, ops=()):
        # the ops keep the send buffers alive until the transfers complete
        self._works, self._received, self._ops = works, received, ops

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        return self._received


class RingComm:
    """Point-to-point K/V (and gradient) exchange for one rank following a :class:`RingSchedule`.

    ``group`` is the cp group; ``inner_group`` / ``outer_group`` carry the inner and outer hops
    of a double ring (for a single ring both hops use ``group``). Every rank issues the same
    sequence of moves, so the sends and receives pair up.
    """

    def __init__(self, schedule: RingSchedule, group, inner_group=None, outer_group=None):
        self.schedule = schedule
        self.group = group
        self.ranks = dist.get_process_group_ranks(group)  # global ranks in cp order
        self.rank = dist.get_rank(group)
        self.groups = {"inner": inner_group or group, "outer": outer_group or group}

    def _exchange(self, tensors, send_to: int, recv_from: int, group, tag: int) -> _Pending:
        received = [torch.empty_like(t) for t in tensors]
        if send_to == self.rank:  # a one-rank ring (cp == 1): nothing to move
            return _Pending([], list(tensors))
        ops = []
        for i, (t, buf) in enumerate(zip(tensors, received, strict=True)):
            # distinct tags keep K, V and the gradients apart on transports that match by tag
            ops.append(dist.P2POp(dist.isend, t.contiguous(), self.ranks[send_to], group, tag + i))
            ops.append(dist.P2POp(dist.irecv, buf, self.ranks[recv_from], group, tag + i))
        return _Pending(dist.batch_isend_irecv(ops), received, ops)

    def start(self, tensors, step: int, tag: int = 0) -> _Pending:
        """Post the hop after ``step`` for ``tensors``; the result holds the next step's block."""
        move = self.schedule.moves[step]
        prev, nxt = self.schedule.prev(self.rank, move), self.schedule.next(self.rank, move)
        return self._exchange(tensors, nxt, prev, self.groups[move], tag)

    def return_home(self, tensors, tag: int = 0) -> list[torch.Tensor]:
        """After the last step: send ``tensors`` (belonging to the block held then) to that block's
        owner and receive this rank's own; blocking."""
        last = self.schedule.held[-1]
        owner, holder = last[self.rank], last.index(self.rank)
        return self._exchange(tensors, owner, holder, self.group, tag).wait()
