"""Pipeline schedules as per-rank op lists, a dependency simulator and a text timeline renderer.

Schedules: ``1f1b``, ``zb1p`` (zero-bubble H1: backward split into an input-gradient pass and a
deferred weight-gradient pass ``W``, 1F1B memory), ``dualpipe`` (two pipeline copies fed from both
ends, DeepSeek-V3) and ``dualpipev`` (DualPipe cut in half: one copy folded in a V over the ranks).
The DualPipe/DualPipeV op lists built here are the ones the executors in ``dualpipe`` and
``dualpipev`` run, so what the simulator measures is what runs.

Costs are in arbitrary time units: ``f`` forward of one chunk, ``b`` full backward (input and
weight gradients), ``w`` the weight-gradient part of ``b`` (so an input-only backward costs
``b - w``), ``fb`` a forward of one chunk overlapped with a full backward of another (DeepSeek's
F&B; default ``f + b``) and ``comm`` the latency of a cross-rank send (default 0).

Bubble of a rank = makespan - busy time of that rank (its idle time inside the step); the
schedule's bubble is the largest of these (step time = busy + bubble). Measured against the
published formulas (tests/pipeline/test_simulator.py), ``PP`` = pipeline stages as in DeepSeek's
README table:

* 1F1B: (PP-1)(F+B) on every rank, any N >= 1.
* ZB1P: (PP-1)(F+B-2W) exactly when W is 0, F or B-W (the zero-bubble paper's F = B-W = W
  setting) and N >= 2*PP; for other W <= min(F, B-W) the greedy W placement is no worse.
* DualPipe (PP ranks, PP stages per copy) and DualPipeV (PP/2 ranks, 2 stages each):
  (PP/2-1)(F&B+B-3W) with dW detach, for any N >= 2*ranks, under DeepSeek's implicit costs
  F = B-W (a forward costs an input-only backward), W <= F and F&B >= B. Without dW detach
  (MindSpeed's default for DualPipeV) it is (PP/2-1)(F&B+B-W). Outside those cost assumptions
  the formulas are only estimates (the simulator reports the actual idle time).

CLI: ``python -m mindspeed_parallel.pipeline.simulator --pp 4 --micro-batches 8 --schedule dualpipev --f 1 --b 2 --w 1``
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import deque
from dataclasses import dataclass

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")

Token = tuple[str, int, int, int]  # (kind "F"/"B", stream, stage, micro-batch): a finished pass


@dataclass(frozen=True)
class Costs:
    """Per-op durations (time units): f, b (full backward), w (weight part of b), fb (F&B), comm."""

    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float | None = None
    comm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("f", "b", "w", "comm"):
            if getattr(self, name) < 0:
                raise ValueError(f"Costs.{name}={getattr(self, name)} is negative; use a cost >= 0")
        if self.w > self.b:
            raise ValueError(f"Costs.w={self.w} exceeds Costs.b={self.b}; w is the weight-gradient part of the full backward b")
        if self.fb is not None and self.fb < 0:
            raise ValueError(f"Costs.fb={self.fb} is negative; use a cost >= 0 (or None for f + b)")

    @property
    def f_and_b(self) -> float:
        """Duration of an overlapped forward + full backward op."""
        return self.f + self.b if self.fb is None else self.fb


@dataclass(frozen=True)
class Task:
    """One pass of one pipeline stage for one micro-batch.

    ``kind``: "F" forward, "B" backward, "W" deferred weight gradient of an earlier input-only "B".
    ``stream``: pipeline copy (DualPipe has two, fed from opposite ends; otherwise 0).
    ``input_only``: a "B" that computes input gradients now and leaves dW to a later "W".
    """

    kind: str
    stage: int
    microbatch: int
    stream: int = 0
    input_only: bool = False


@dataclass(frozen=True)
class Op:
    """What one rank runs in one slot: one task, or a forward and a backward run overlapped."""

    tasks: tuple[Task, ...]

    @property
    def kind(self) -> str:
        """Kind: "F", "B" (full), "b" (input-only), "W" or "FB" (overlapped forward + full backward)."""
        if len(self.tasks) == 2:
            return "FB"
        task = self.tasks[0]
        return "b" if task.kind == "B" and task.input_only else task.kind

    def duration(self, costs: Costs) -> float:
        """Time the op occupies its rank under ``costs``."""
        return {"F": costs.f, "B": costs.b, "b": costs.b - costs.w, "W": costs.w, "FB": costs.f_and_b}[self.kind]


@dataclass(frozen=True)
class Schedule:
    """Per-rank op lists plus the placement ``stage_rank[stream][stage] -> rank``."""

    name: str
    num_ranks: int
    num_microbatches: int
    stage_rank: tuple[tuple[int, ...], ...]
    rank_ops: tuple[tuple[Op, ...], ...]

    @property
    def num_stages(self) -> int:
        """Stages per stream (chunks of one model copy)."""
        return len(self.stage_rank[0])


# ----------------------------------------------------------------------------- builders


def _check_sizes(pp: int, micro_batches: int, schedule: str) -> None:
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"pp={pp!r} must be a positive int (number of pipeline ranks)")
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches={micro_batches!r} must be a positive int")
    if schedule in ("dualpipe", "dualpipev") and micro_batches < 2 * pp:
        raise ValueError(f"{schedule} needs micro_batches >= 2 * pp; got micro_batches={micro_batches}, pp={pp}")
    if schedule == "dualpipe" and (pp % 2 or micro_batches % 2):
        raise ValueError(f"dualpipe needs an even pp and even micro_batches; got pp={pp}, micro_batches={micro_batches}")


def build_1f1b(pp: int, micro_batches: int) -> Schedule:
    """Classic one-forward-one-backward: rank r warms up with pp-r-1 forwards."""
    _check_sizes(pp, micro_batches, "1f1b")
    rank_ops = []
    for rank in range(pp):
        warmup = min(pp - rank - 1, micro_batches)
        ops = [_single("F", rank, m) for m in range(warmup)]
        for m in range(micro_batches - warmup):
            ops += [_single("F", rank, warmup + m), _single("B", rank, m)]
        ops += [_single("B", rank, m) for m in range(micro_batches - warmup, micro_batches)]
        rank_ops.append(tuple(ops))
    return Schedule("1f1b", pp, micro_batches, (tuple(range(pp)),), tuple(rank_ops))


def build_zb1p(pp: int, micro_batches: int, costs: Costs | None = None) -> Schedule:
    """Zero-bubble H1 (1F1B memory): input-only backwards first, weight passes fill the idle gaps.

    Built greedily in time order under ``costs`` (the W placement depends on them): a free rank runs
    a ready backward, else a ready forward while fewer than pp-r micro-batches are in flight, else
    a pending W, else waits for its next input. Leftover Ws run at the end.
    """
    _check_sizes(pp, micro_batches, "zb1p")
    builder = _GreedyZB(pp, micro_batches, costs or Costs())
    while builder.active():
        builder.advance()
    return Schedule("zb1p", pp, micro_batches, (tuple(range(pp)),), tuple(tuple(o) for o in builder.ops))


class _GreedyZB:
    """State of the greedy ZB-H1 construction (one stream, stage r on rank r)."""

    def __init__(self, pp: int, micro_batches: int, costs: Costs) -> None:
        self.pp, self.n, self.costs = pp, micro_batches, costs
        self.done: dict[Token, tuple[float, int]] = {}
        self.free, self.blocked_at = [0.0] * pp, [-1.0] * pp
        self.next_f, self.next_b = [0] * pp, [0] * pp
        self.pending_w: list[deque[int]] = [deque() for _ in range(pp)]
        self.ops: list[list[Op]] = [[] for _ in range(pp)]

    def active(self) -> bool:
        return any(self._busy(r) for r in range(self.pp))

    def _busy(self, rank: int) -> bool:
        return self.next_b[rank] < self.n or bool(self.pending_w[rank])

    def _arrival(self, token: Token | None, rank: int) -> float | None:
        if token is None:
            return 0.0
        if token not in self.done:
            return None
        end, src = self.done[token]
        return end + (self.costs.comm if src != rank else 0.0)

    def _candidates(self, rank: int) -> list[tuple[str, Token | None]]:
        out = []
        if self.next_b[rank] < self.next_f[rank]:
            m = self.next_b[rank]
            out.append(("B", ("B", 0, rank + 1, m) if rank < self.pp - 1 else ("F", 0, rank, m)))
        if self.next_f[rank] < self.n and self.next_f[rank] - self.next_b[rank] < self.pp - rank:
            out.append(("F", ("F", 0, rank - 1, self.next_f[rank]) if rank > 0 else None))
        return out

    def advance(self) -> None:
        """Let the earliest rank (unblocked ones first on ties) run one op or wait."""
        rank = min(
            (r for r in range(self.pp) if self._busy(r)), key=lambda r: (self.free[r], self.blocked_at[r] == self.free[r], r)
        )
        now, wake = self.free[rank], math.inf
        for kind, token in self._candidates(rank):
            at = self._arrival(token, rank)
            if at is not None and at <= now:
                return self._run(rank, kind)
            wake = min(wake, math.inf if at is None else at)
        if self.pending_w[rank]:
            return self._run(rank, "W")
        if self.blocked_at[rank] != now:  # give the other ranks at this instant a turn first
            self.blocked_at[rank] = now
            return None
        later = [self.free[r] for r in range(self.pp) if self.free[r] > now and self._busy(r)]
        if not math.isfinite(min([wake, *later])):
            raise RuntimeError(f"zb1p: rank {rank} can never run its next op (schedule bug)")
        self.free[rank] = min([wake, *later])
        return None

    def _run(self, rank: int, kind: str) -> None:
        if kind == "F":
            task = Task("F", rank, self.next_f[rank])
            self.next_f[rank] += 1
        elif kind == "B":
            task = Task("B", rank, self.next_b[rank], input_only=True)
            self.pending_w[rank].append(self.next_b[rank])
            self.next_b[rank] += 1
        else:
            task = Task("W", rank, self.pending_w[rank].popleft())
        op = Op((task,))
        self.free[rank] += op.duration(self.costs)
        if kind != "W":
            self.done[(kind, 0, rank, task.microbatch)] = (self.free[rank], rank)
        self.ops[rank].append(op)


def dual_program(num_half: int, half_rank: int, chunks: int, dw_detach: bool, split_first_fb: bool) -> list[tuple]:
    """The DualPipe step program of one rank in local phases (phase 0 = the chunk whose stream
    starts on this half of the pipeline, phase 1 = the other chunk).

    Returns steps ``("F", p)``, ``("B", p, input_only)``, ``("W",)``, ``("FB", p_fwd, p_bwd)``.
    ``num_half``: ranks per half (DualPipeV: all ranks); ``half_rank``: distance from the outer end;
    ``chunks``: micro-batches per stream; ``split_first_fb``: the innermost rank runs its first
    F&B as a plain F then B (it would otherwise wait on itself). Warm-up B1/W/F1 triples always
    split the backward; cooldown backwards are split only with ``dw_detach`` (MindSpeed's
    ``--dualpipev-dw-detach``; DeepSeek's reference always splits them).
    """
    n, h = num_half, half_rank
    prog: list[tuple] = [("F", 0)] * (2 * (n - h - 1))
    prog += [("F", 0), ("F", 1)] * (h + 1)
    prog += [("B", 1, True), ("W",), ("F", 1)] * (n - h - 1)
    for i in range(chunks - 2 * n + h + 1):
        prog += [("F", 0), ("B", 1, False)] if i == 0 and split_first_fb else [("FB", 0, 1)]
        prog.append(("FB", 1, 0))
    prog += [("B", 1, False), ("FB", 1, 0)] * (n - h - 1)
    detach_from = (h + 1) // 2  # second half of the interleaved backwards defer dW
    for i in range(h + 1):
        for phase in (1, 0):
            # the earliest deferred B alternates phase with rank parity so each rank defers h+1 passes
            late = i > detach_from or (i == detach_from and (phase == 0 or h % 2 == 1))
            prog.append(("B", phase, dw_detach and late))
    if dw_detach:
        prog += [("W",), ("B", 0, True)] * (n - h - 1) + [("W",)] * (h + 1)
    else:
        prog += [("B", 0, False)] * (n - h - 1)
    return prog


def label_program(program: list[tuple], placement: tuple[tuple[int, int], tuple[int, int]]) -> tuple[Op, ...]:
    """Turn a local-phase program into ops; ``placement[phase] = (stream, stage)``. Micro-batches
    run in order per phase; each W completes the oldest input-only backward (FIFO)."""
    next_f, next_b, deferred = [0, 0], [0, 0], deque()
    ops = []

    def task(kind: str, phase: int, input_only: bool = False) -> Task:
        counter = next_f if kind == "F" else next_b
        stream, stage = placement[phase]
        made = Task(kind, stage, counter[phase], stream, input_only)
        counter[phase] += 1
        if input_only:
            deferred.append(made)
        return made

    for step in program:
        if step[0] == "W":
            if not deferred:
                raise RuntimeError("dual_program: W with no deferred backward (schedule bug)")
            done = deferred.popleft()
            ops.append(Op((Task("W", done.stage, done.microbatch, done.stream),)))
        elif step[0] == "FB":
            ops.append(Op((task("F", step[1]), task("B", step[2]))))
        else:
            ops.append(Op((task(*step),)))
    if deferred:
        raise RuntimeError("dual_program: deferred backwards left without a W (schedule bug)")
    return tuple(ops)


def build_dualpipev(pp: int, micro_batches: int, dw_detach: bool = False) -> Schedule:
    """DualPipeV over ``pp`` ranks = 2*pp stages in a V: rank r holds stages r and 2*pp-1-r."""
    _check_sizes(pp, micro_batches, "dualpipev")
    stage_rank = tuple(s if s < pp else 2 * pp - 1 - s for s in range(2 * pp))
    rank_ops = tuple(
        label_program(dual_program(pp, r, micro_batches, dw_detach, r == pp - 1), ((0, r), (0, 2 * pp - 1 - r)))
        for r in range(pp)
    )
    return Schedule("dualpipev", pp, micro_batches, (stage_rank,), rank_ops)


def build_dualpipe(pp: int, micro_batches: int, dw_detach: bool = True) -> Schedule:
    """DualPipe over ``pp`` (even) ranks: stream 0 runs stages 0..pp-1 on ranks 0..pp-1, stream 1
    the same stages on ranks pp-1..0; each stream gets micro_batches/2 micro-batches."""
    _check_sizes(pp, micro_batches, "dualpipe")
    half = pp // 2
    rank_ops = []
    for r in range(pp):
        second = r >= half
        directions = ((0, r), (1, pp - 1 - r))
        placement = (directions[second], directions[not second])
        h = min(r, pp - 1 - r)
        rank_ops.append(label_program(dual_program(half, h, micro_batches // 2, dw_detach, h == half - 1), placement))
    stage_rank = (tuple(range(pp)), tuple(range(pp - 1, -1, -1)))
    return Schedule("dualpipe", pp, micro_batches, stage_rank, tuple(rank_ops))


def build(schedule: str, pp: int, micro_batches: int, dw_detach: bool = False, costs: Costs | None = None) -> Schedule:
    """Build a schedule by name (one of ``SCHEDULES``)."""
    if schedule == "1f1b":
        return build_1f1b(pp, micro_batches)
    if schedule == "zb1p":
        return build_zb1p(pp, micro_batches, costs)
    if schedule == "dualpipev":
        return build_dualpipev(pp, micro_batches, dw_detach)
    if schedule == "dualpipe":
        return build_dualpipe(pp, micro_batches, dw_detach)
    raise ValueError(f"schedule={schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")


def _single(kind: str, stage: int, microbatch: int) -> Op:
    return Op((Task(kind, stage, microbatch),))


# ----------------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class Timeline:
    """Simulated run: ``rows[rank]`` = ((start, end, op), ...) in time order."""

    schedule: Schedule
    costs: Costs
    rows: tuple[tuple[tuple[float, float, Op], ...], ...]

    @property
    def makespan(self) -> float:
        """End of the last op on any rank."""
        return max((row[-1][1] for row in self.rows if row), default=0.0)

    def busy(self, rank: int) -> float:
        """Time ``rank`` spends running ops."""
        return sum(end - start for start, end, _ in self.rows[rank])

    def bubbles(self) -> list[float]:
        """Idle time per rank inside the step: makespan - busy."""
        return [self.makespan - self.busy(r) for r in range(len(self.rows))]


def needs(task: Task, num_stages: int) -> list[Token]:
    """Passes that must finish before ``task`` can start (beyond its rank's own order)."""
    if task.kind == "F":
        return [("F", task.stream, task.stage - 1, task.microbatch)] if task.stage > 0 else []
    if task.kind == "B":
        if task.stage == num_stages - 1:
            return [("F", task.stream, task.stage, task.microbatch)]
        return [("B", task.stream, task.stage + 1, task.microbatch)]
    return [("B", task.stream, task.stage, task.microbatch)]


def simulate(schedule: Schedule, costs: Costs) -> Timeline:
    """Run every rank's ops in order; an op starts when its rank is free and its inputs arrived
    (cross-rank inputs arrive ``costs.comm`` after they were produced). Raises on deadlock."""
    _check_placement(schedule)
    done: dict[Token, tuple[float, int]] = {}
    pos, free = [0] * schedule.num_ranks, [0.0] * schedule.num_ranks
    rows: list[list[tuple[float, float, Op]]] = [[] for _ in range(schedule.num_ranks)]
    while any(pos[r] < len(schedule.rank_ops[r]) for r in range(schedule.num_ranks)):
        moved = False
        for rank, ops in enumerate(schedule.rank_ops):
            while pos[rank] < len(ops):
                start = _ready_time(ops[pos[rank]], rank, free[rank], done, costs, schedule.num_stages)
                if start is None:
                    break
                op, end = ops[pos[rank]], start + ops[pos[rank]].duration(costs)
                for task in op.tasks:
                    if task.kind != "W":
                        done[(task.kind, task.stream, task.stage, task.microbatch)] = (end, rank)
                rows[rank].append((start, end, op))
                free[rank], pos[rank], moved = end, pos[rank] + 1, True
        if not moved:
            stuck = {r: schedule.rank_ops[r][pos[r]] for r in range(schedule.num_ranks) if pos[r] < len(schedule.rank_ops[r])}
            raise RuntimeError(f"{schedule.name}: deadlock; ranks wait at {stuck}")
    return Timeline(schedule, costs, tuple(tuple(row) for row in rows))


def _ready_time(op: Op, rank: int, free: float, done: dict, costs: Costs, num_stages: int) -> float | None:
    own = {(t.kind, t.stream, t.stage, t.microbatch) for t in op.tasks}
    start = free
    for task in op.tasks:
        for token in needs(task, num_stages):
            if token in own:
                continue
            if token not in done:
                return None
            end, src = done[token]
            start = max(start, end + (costs.comm if src != rank else 0.0))
    return start


def _check_placement(schedule: Schedule) -> None:
    for rank, ops in enumerate(schedule.rank_ops):
        for op in ops:
            for task in op.tasks:
                if schedule.stage_rank[task.stream][task.stage] != rank:
                    raise ValueError(f"{schedule.name}: rank {rank} runs {task} placed on another rank")


# ----------------------------------------------------------------------------- rendering


LETTERS = {"F": "F", "B": "B", "b": "D", "W": "W"}  # D: input-gradient-only backward (dW later in a W)


def task_label(task: Task, schedule: Schedule) -> str:
    """Letter + micro-batch: F forward, B full backward, D input-only backward, W weight gradient;
    lower case marks the second leg of the V (DualPipeV chunks PP..2PP-1) or DualPipe's stream 1."""
    kind = "b" if task.kind == "B" and task.input_only else task.kind
    second = task.stream == 1 or (schedule.name == "dualpipev" and task.stage >= schedule.num_ranks)
    letter = LETTERS[kind]
    return f"{letter.lower() if second else letter}{task.microbatch}"


def op_label(op: Op, schedule: Schedule) -> str:
    """Cell text of an op: its task label, or both for an overlapped F&B (e.g. ``F7b3``)."""
    return "".join(task_label(task, schedule) for task in op.tasks)


def render(timeline: Timeline, scale: float = 1.0) -> str:
    """One row per rank, ``scale`` characters per time unit ('.' = idle), then bubble per rank.

    A cell starts with its op label (``task_label``) cut to the cell width and is filled with the
    first letter, so at one character per unit a 1-unit op shows only its letter."""
    width = max(1, round(timeline.makespan * scale))
    lines = []
    for rank, row in enumerate(timeline.rows):
        cells = ["."] * width
        for start, end, op in row:
            lo, hi = round(start * scale), max(round(end * scale), round(start * scale) + 1)
            text = op_label(op, timeline.schedule)
            cells[lo:hi] = list((text + text[0] * (hi - lo))[: hi - lo])
        lines.append(f"rank {rank:>2} |{''.join(cells)}|")
    bubbles = timeline.bubbles()
    lines.append(f"makespan {timeline.makespan:g}; bubble per rank: {', '.join(f'{b:g}' for b in bubbles)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: build, simulate and print a schedule's timeline."""
    parser = argparse.ArgumentParser(prog="python -m mindspeed_parallel.pipeline.simulator", description=__doc__.split("\n")[0])
    parser.add_argument("--pp", type=int, required=True, help="pipeline ranks (DualPipeV: 2*pp stages)")
    parser.add_argument("--micro-batches", type=int, required=True)
    parser.add_argument("--schedule", choices=SCHEDULES, default="dualpipev")
    parser.add_argument("--f", type=float, default=1.0, help="forward cost of one chunk")
    parser.add_argument("--b", type=float, default=2.0, help="full backward cost of one chunk")
    parser.add_argument("--w", type=float, default=1.0, help="weight-gradient part of --b")
    parser.add_argument("--fb", type=float, default=None, help="overlapped forward+backward cost (default f+b)")
    parser.add_argument("--comm", type=float, default=0.0, help="cross-rank send latency")
    parser.add_argument("--dw-detach", action="store_true", help="DualPipe(V): defer dW in the cooldown")
    parser.add_argument("--scale", type=float, default=1.0, help="characters per time unit")
    args = parser.parse_args(argv)
    try:
        costs = Costs(args.f, args.b, args.w, args.fb, args.comm)
        timeline = simulate(build(args.schedule, args.pp, args.micro_batches, args.dw_detach, costs), costs)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(timeline, args.scale))
    return 0


if __name__ == "__main__":
    sys.exit(main())
