"""Adaptive context parallelism (``adaptive_cp_algo``): a plan built from a general attention mask.

Given the full mask (bool [S, S] or [B, 1, S, S] in global positions, True = masked out) and
the cp size, :func:`build_plan` decides

(a) the **remapping**: which global positions each cp rank holds. Rank ``r`` holds
    ``plan.order[r*L:(r+1)*L]`` (``L = S / cp``, ascending inside the rank). The order balances
    the unmasked (query, key) pairs each rank's queries own and keeps attending tokens
    together, so that many (query rank, key rank) blocks are fully masked. It is searched on
    a coarsened mask (``coarse_size`` units of ``S / coarse_size`` consecutive tokens) unless
    ``without_coarse`` (``adaptive_cp_without_coarse``: one token per unit), and skipped with
    ``only_reschedule`` (``adaptive_cp_only_reschedule``: the plain contiguous split).
(b) the **schedule**: every (query rank i, key rank j) block with at least one visible pair is
    a :class:`Task`, trimmed to the query rows that see something in the block and the key rows
    seen by some query. Tasks run in rounds, at most one per rank per round; a task runs on
    its query rank (which then receives the trimmed K/V of rank j) or, when that rank is busy
    and rank j would be idle, on rank j (which receives the trimmed queries and sends the
    partial result back). Fully masked blocks are neither computed nor communicated.

Plans are deterministic functions of (mask, cp, options), so every rank computes the same plan
on its own. :class:`AdaptivePlanner` caches them by mask content (``adaptive_cp_dynamic_attn_mask``
turns the cache off) and precomputes the plans of a caller-given mask list
(``adaptive_cp_manually_set_mask_list``). Data helpers for the remapped layout live in
`mindspeed_parallel.cp.adaptive_data`; attention in `mindspeed_parallel.cp.adaptive_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["AdaptiveOptions", "AdaptivePlan", "AdaptivePlanner", "Task", "build_plan", "causal_mask"]


@dataclass(frozen=True)
class AdaptiveOptions:
    """The adaptive-CP switches of seed 000 section 12.

    ``without_coarse``: search the remapping token by token (exact, slower; MindSpeed recommends
    it only below 8K tokens). ``dynamic_attn_mask``: the mask changes between batches, so plans
    are not cached. ``only_reschedule``: keep the contiguous split, only schedule the blocks.
    ``coarse_size``: units of the coarsened mask (at most; rounded so units divide S and cp
    divides their count). ``balance_tolerance``: a remapping whose max per-rank work over the mean
    is within this is preferred for having the fewest non-empty blocks; above it, the most
    balanced candidate wins.
    """

    without_coarse: bool = False
    dynamic_attn_mask: bool = False
    only_reschedule: bool = False
    coarse_size: int = 1024
    balance_tolerance: float = 1.1

    def __post_init__(self):
        if not isinstance(self.coarse_size, int) or self.coarse_size < 1:
            raise ValueError(f"coarse_size={self.coarse_size!r} must be a positive int (units of the coarsened mask)")
        if not self.balance_tolerance >= 1.0:
            raise ValueError(f"balance_tolerance={self.balance_tolerance!r} must be >= 1.0 (max / mean per-rank work)")


@dataclass(frozen=True, eq=False)
class Task:
    """One (query rank, key rank) block with visible pairs.

    ``q_rows`` / ``kv_rows``: int64 local rows (of ``q_rank`` / ``kv_rank``'s ``L`` rows, CPU)
    kept after trimming; ``q_pos`` / ``kv_pos`` their global positions. ``executor``: the rank
    computing it (``q_rank`` or ``kv_rank``); ``round``: when. ``work``: visible pairs.
    """

    index: int
    q_rank: int
    kv_rank: int
    executor: int
    round: int
    q_rows: torch.Tensor
    kv_rows: torch.Tensor
    q_pos: torch.Tensor
    kv_pos: torch.Tensor
    work: int


@dataclass(frozen=True, eq=False)
class AdaptivePlan:
    """A remapping and a schedule for one mask shape and cp size (see the module docstring).

    ``order``: int64 [S] (CPU), the global position at each remapped index; ``rounds``: the
    tasks of each round.
    """

    cp: int
    seq_len: int
    order: torch.Tensor
    rounds: tuple[tuple[Task, ...], ...]
    options: AdaptiveOptions

    @property
    def local_len(self) -> int:
        """Tokens per rank, ``S / cp``."""
        return self.seq_len // self.cp

    @property
    def tasks(self) -> tuple[Task, ...]:
        return tuple(t for tasks in self.rounds for t in tasks)

    def indices(self, cp_rank: int, device=None) -> torch.Tensor:
        """Global positions held by ``cp_rank`` (also its position ids): int64 [S / cp]."""
        if not isinstance(cp_rank, int) or not 0 <= cp_rank < self.cp:
            raise ValueError(f"cp_rank={cp_rank!r} must be an int in [0, {self.cp})")
        rows = self.order[cp_rank * self.local_len : (cp_rank + 1) * self.local_len]
        return rows.to(device) if device is not None else rows.clone()

    def owned_work(self) -> list[int]:
        """Visible (query, key) pairs of each rank's queries (what the remapping balances)."""
        work = [0] * self.cp
        for t in self.tasks:
            work[t.q_rank] += t.work
        return work

    def executed_work(self) -> list[int]:
        """Visible pairs each rank computes under the schedule."""
        work = [0] * self.cp
        for t in self.tasks:
            work[t.executor] += t.work
        return work

    def grid(self) -> torch.Tensor:
        """bool [cp, cp]: True where block (query rank, key rank) has visible pairs (is a task)."""
        out = torch.zeros(self.cp, self.cp, dtype=torch.bool)
        for t in self.tasks:
            out[t.q_rank, t.kv_rank] = True
        return out


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """bool [S, S], True above the diagonal: the causal mask as a general mask."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)


# ----------------------------------------------------------------------------- planning


def build_plan(attention_mask: torch.Tensor, cp_size: int, options: AdaptiveOptions | None = None) -> AdaptivePlan:
    """Plan adaptive CP for ``attention_mask`` (bool [S, S] or [B, 1, S, S], True = masked out, any
    device; a batch of masks is planned on the union of what any row sees) over ``cp_size`` ranks.

    ``S`` must divide by ``cp_size``. Costs O(S^2) memory and time on the CPU.
    """
    options = options or AdaptiveOptions()
    if not isinstance(options, AdaptiveOptions):
        raise TypeError(f"options must be an AdaptiveOptions, got {type(options).__name__}")
    visible = _visible(attention_mask)
    seq = visible.shape[0]
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size={cp_size!r} must be a positive int (the adaptive cp group size)")
    if seq % cp_size:
        raise ValueError(f"attention_mask: sequence length {seq} must divide by cp_size={cp_size}; pad it by {-seq % cp_size}")
    if options.only_reschedule:
        order = torch.arange(seq)
    else:
        order = _remap(visible, cp_size, options)
    blocks = _blocks(visible, order, cp_size)
    rounds = _schedule(blocks, cp_size, order)
    return AdaptivePlan(cp_size, seq, order, rounds, options)


def _visible(mask) -> torch.Tensor:
    """bool [S, S] on the CPU: True where some batch row sees the pair."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError("attention_mask must be a bool tensor (True = masked out), [S, S] or [B, 1, S, S]")
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask.all(0)[0]  # a pair is skipped only if every batch row masks it
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; pass [S, S] or [B, 1, S, S] (self-attention)")
    return (~mask).cpu()


def _coarse_ratio(seq: int, cp: int, options: AdaptiveOptions) -> int:
    """Tokens per unit: the smallest divisor ``r`` of S with S/r <= coarse_size units, divisible by cp."""
    if options.without_coarse:
        return 1
    for ratio in range(1, seq + 1):
        units = seq // ratio
        if seq % ratio == 0 and units % cp == 0 and units <= max(options.coarse_size, cp):
            return ratio
    raise AssertionError("unreachable: ratio = S / cp always qualifies")


def _remap(visible: torch.Tensor, cp: int, options: AdaptiveOptions) -> torch.Tensor:
    """The balanced remapping: token order [S] (rank r's tokens are the r-th run of S/cp)."""
    seq = visible.shape[0]
    ratio = _coarse_ratio(seq, cp, options)
    units = seq // ratio
    coarse = visible.view(units, ratio, units, ratio).any(3).any(1)
    work = torch.count_nonzero(visible, dim=1).double().view(units, ratio).sum(1)  # exact pairs per unit
    assign = _best_assignment(coarse, work, cp, options.balance_tolerance)
    unit_order = torch.tensor([u for rank_units in assign for u in sorted(rank_units)])
    return (unit_order[:, None] * ratio + torch.arange(ratio)).flatten()


def _best_assignment(coarse: torch.Tensor, work: torch.Tensor, cp: int, tolerance: float) -> list[list[int]]:
    """Units per rank. Candidates: the contiguous split (listed first, so it wins ties: dense
    masks keep the plain split), a zig-zag over each independent segment (the ring's balance
    for causal masks, documents kept together), and both refined by balancing swaps."""
    units = coarse.shape[0]
    per = units // cp
    contiguous = [list(range(r * per, (r + 1) * per)) for r in range(cp)]
    order = _segment_zigzag(coarse)
    zigzag = [order[r * per : (r + 1) * per] for r in range(cp)]
    candidates = [contiguous, zigzag, _rebalance(zigzag, work), _rebalance(contiguous, work)]
    scored = [(_imbalance(a, work), _nonempty_blocks(a, coarse, cp), i) for i, a in enumerate(candidates)]
    balanced = [s for s in scored if s[0] <= tolerance + 1e-12]
    best = min(balanced, key=lambda s: (s[1], s[2])) if balanced else min(scored, key=lambda s: (s[0], s[2]))
    return candidates[best[2]]


def _segment_zigzag(coarse: torch.Tensor) -> list[int]:
    """Units in segment order, each segment zig-zagged (first, last, second, second-last, ...).

    A segment is a maximal run of units no pair attends across (in either direction): a
    document of a block-diagonal mask, or the whole sequence for a causal one.
    """
    units = coarse.shape[0]
    sym = coarse | coarse.T
    idx = torch.arange(units)
    reach = torch.where(sym, idx[None, :], idx[:, None]).amax(1)  # furthest unit each one touches
    ends = (torch.cummax(reach, 0).values <= idx).nonzero().flatten().tolist()  # a cut after these
    order, start = [], 0
    for end in ends:
        seg = list(range(start, end + 1))
        for a in range((len(seg) + 1) // 2):
            order.append(seg[a])
            if len(seg) - 1 - a != a:
                order.append(seg[len(seg) - 1 - a])
        start = end + 1
    return order


def _rebalance(assign: list[list[int]], work: torch.Tensor, max_swaps: int = 512) -> list[list[int]]:
    """Swap units between the heaviest and the lightest rank while that lowers the pair's maximum."""
    assign = [list(a) for a in assign]
    loads = torch.tensor([float(work[a].sum()) for a in assign], dtype=torch.float64)
    for _ in range(max_swaps):
        heavy, light = int(loads.argmax()), int(loads.argmin())
        gap = float(loads[heavy] - loads[light])
        diff = work[assign[heavy]][:, None] - work[assign[light]][None, :]
        ok = (diff > 0) & (diff < gap)
        if gap <= 0 or not ok.any():
            break
        # move half the gap as closely as possible: both ranks end below the old maximum
        cost = (diff - gap / 2).abs().masked_fill(~ok, math.inf)
        a, b = divmod(int(cost.argmin()), cost.shape[1])
        assign[heavy][a], assign[light][b] = assign[light][b], assign[heavy][a]
        loads[heavy] -= diff[a, b]
        loads[light] += diff[a, b]
    return assign


def _imbalance(assign: list[list[int]], work: torch.Tensor) -> float:
    loads = [float(work[a].sum()) for a in assign]
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def _nonempty_blocks(assign: list[list[int]], coarse: torch.Tensor, cp: int) -> int:
    owner = torch.empty(coarse.shape[0], dtype=torch.long)
    for rank, units in enumerate(assign):
        owner[units] = rank
    onehot = torch.nn.functional.one_hot(owner, cp).double()
    return int(((onehot.T @ coarse.double() @ onehot) > 0).sum())


@dataclass(frozen=True, eq=False)
class _Block:
    q_rank: int
    kv_rank: int
    q_rows: torch.Tensor
    kv_rows: torch.Tensor
    work: int


def _blocks(visible: torch.Tensor, order: torch.Tensor, cp: int) -> list[_Block]:
    """The non-empty (query rank, key rank) blocks under ``order``, trimmed to rows/columns with
    visible pairs (rows that see nothing in a block contribute nothing to it: skipping is exact)."""
    local = visible.shape[0] // cp
    permuted = visible if torch.equal(order, torch.arange(order.numel())) else visible[order][:, order]
    # two passes over the S x S mask (block-wise sums over strided views are several times slower)
    row_counts = torch.count_nonzero(permuted.view(-1, cp, local), dim=2).view(cp, local, cp)  # [i, row, j]
    col_seen = permuted.view(cp, local, cp, local).any(1)  # [i, j, col]
    work = row_counts.sum(1)
    blocks = []
    for i in range(cp):
        for j in range(cp):
            if work[i, j]:
                rows, cols = row_counts[i, :, j].nonzero().flatten(), col_seen[i, j].nonzero().flatten()
                blocks.append(_Block(i, j, rows, cols, int(work[i, j])))
    return blocks


def _schedule(blocks: list[_Block], cp: int, order: torch.Tensor) -> tuple[tuple[Task, ...], ...]:
    """Rounds of tasks, at most one per executing rank per round.

    Each round, every rank with blocks of its own left computes one (its diagonal block first,
    then the one whose K/V source sends the least this round, ring order on ties), receiving
    K/V. A rank with nothing of its own left helps the rank with the most work ahead by
    computing one of its blocks against the helper's own K/V (receiving the queries instead),
    but only while the helper's total stays within the donor's: helping never raises the
    largest per-rank work, it only shortens the schedule.
    """
    own = [sorted((b for b in blocks if b.q_rank == i), key=lambda b: (b.q_rank - b.kv_rank) % cp) for i in range(cp)]
    load = [0] * cp  # work executed so far
    left = [sum(b.work for b in bs) for bs in own]  # own work not yet scheduled
    rounds: list[list[tuple[_Block, int]]] = []
    while any(own):
        this, sends = [], [0] * cp
        for i in sorted(range(cp), key=lambda r: (-left[r], r)):
            if own[i]:
                pick = min(own[i], key=lambda b: sends[b.kv_rank] if b.kv_rank != i else -1)
                sends[pick.kv_rank] += pick.kv_rank != i
                this.append(_take(own, left, load, pick, i))
        busy = {executor for _, executor in this}
        for helper in (r for r in range(cp) if r not in busy):
            offers = [b for i in range(cp) for b in own[i] if b.kv_rank == helper]
            offers = [b for b in offers if load[helper] + b.work <= load[b.q_rank] + left[b.q_rank]]
            if offers:
                pick = max(offers, key=lambda b: (load[b.q_rank] + left[b.q_rank], -b.q_rank))
                this.append(_take(own, left, load, pick, helper))
        rounds.append(this)
    return _number(rounds, order, order.numel() // cp)


def _take(own, left, load, block: _Block, executor: int) -> tuple[_Block, int]:
    own[block.q_rank].remove(block)
    left[block.q_rank] -= block.work
    load[executor] += block.work
    return block, executor


def _number(rounds, order: torch.Tensor, local: int) -> tuple[tuple[Task, ...], ...]:
    """Tasks in execution order (round, executor), with global positions of their rows."""
    out, index = [], 0
    for r, pairs in enumerate(rounds):
        tasks = []
        for b, executor in sorted(pairs, key=lambda p: (p[1], p[0].q_rank, p[0].kv_rank)):
            q_pos, kv_pos = order[b.q_rank * local + b.q_rows], order[b.kv_rank * local + b.kv_rows]
            tasks.append(Task(index, b.q_rank, b.kv_rank, executor, r, b.q_rows, b.kv_rows, q_pos, kv_pos, b.work))
            index += 1
        out.append(tuple(tasks))
    return tuple(out)


# ----------------------------------------------------------------------------- caching


class AdaptivePlanner:
    """Plans for one cp size and options, cached by mask content.

    ``mask_list`` (``adaptive_cp_manually_set_mask_list``): masks whose plans are computed up
    front and always kept. Other masks are planned on first use and cached (up to
    ``max_cached``, least recently used dropped) unless ``options.dynamic_attn_mask``, which plans
    every call. ``hits`` / ``misses`` count lookups. Not thread-safe; one per cp group.
    """

    def __init__(self, cp_size: int, options: AdaptiveOptions | None = None, mask_list=None, max_cached: int = 4):
        self.cp_size, self.options = cp_size, options or AdaptiveOptions()
        if not isinstance(max_cached, int) or max_cached < 0:
            raise ValueError(f"max_cached={max_cached!r} must be a non-negative int")
        self.max_cached = max_cached
        self.hits = self.misses = 0
        self._fixed = [(m.detach().clone(), build_plan(m, cp_size, self.options)) for m in (mask_list or [])]
        self._cache: list[tuple[torch.Tensor, AdaptivePlan]] = []

    def plan(self, attention_mask: torch.Tensor) -> AdaptivePlan:
        """The plan for ``attention_mask`` (see :func:`build_plan`)."""
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a bool tensor (True = masked out), got {type(attention_mask).__name__}")
        for entries in (self._fixed, self._cache):
            for pos, (key, plan) in enumerate(entries):
                if key.shape == attention_mask.shape and key.device == attention_mask.device and torch.equal(key, attention_mask):
                    self.hits += 1
                    if entries is self._cache:  # most recently used last
                        entries.append(entries.pop(pos))
                    return plan
        self.misses += 1
        plan = build_plan(attention_mask, self.cp_size, self.options)
        if not self.options.dynamic_attn_mask and self.max_cached:
            self._cache.append((attention_mask.detach().clone(), plan))
            del self._cache[: -self.max_cached]
        return plan
