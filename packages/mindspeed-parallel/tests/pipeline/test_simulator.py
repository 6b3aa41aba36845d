"""Schedule simulator: bubbles equal the published formulas (DeepSeek DualPipe README, zero-bubble
paper) where their cost assumptions hold; op lists are complete and deadlock-free; CLI prints."""

import subprocess
import sys
from collections import Counter

import pytest

from mindspeed_parallel.pipeline.simulator import (
    Costs,
    Op,
    Schedule,
    Task,
    build,
    build_1f1b,
    build_dualpipe,
    build_dualpipev,
    build_zb1p,
    main,
    render,
    simulate,
)

# (f, b, w, fb): DeepSeek's table assumes a forward costs as much as an input-only backward
# (f == b - w), w <= f and an overlapped F&B at least as long as a full backward (fb >= b).
DUAL_COSTS = [(1, 2, 1, None), (1, 2, 1, 2.4), (2, 3, 1, 4), (2, 4, 2, None), (3, 4, 1, 5.6), (3, 3, 0, 3), (2, 2, 0, 3.2)]
SIZES = [2, 3, 4, 6]


def _micro_batch_counts(pp):
    return [2 * pp, 2 * pp + 1, 3 * pp, 4 * pp + 2]


@pytest.mark.parametrize("pp", [2, 3, 4, 8])
@pytest.mark.parametrize("costs", [(1, 2, 1), (1, 1, 0), (2, 3, 1), (3, 5, 2)])
def test_1f1b_bubble_is_pp_minus_1_times_f_plus_b(pp, costs):
    f, b, w = costs
    for n in (pp, 2 * pp, 3 * pp + 1):
        timeline = simulate(build_1f1b(pp, n), Costs(f, b, w))
        assert timeline.bubbles() == pytest.approx([(pp - 1) * (f + b)] * pp)


@pytest.mark.parametrize("pp", [2, 3, 4, 8])
@pytest.mark.parametrize("costs", [(1, 2, 1), (2, 4, 2), (1, 3, 1), (2, 3, 1), (3, 4, 2), (1, 2, 0)])
def test_zb1p_bubble_is_pp_minus_1_times_f_plus_b_minus_2w(pp, costs):
    # ZB-H1's formula is exact when W equals F or the input-only backward (B - W), the zero-bubble
    # paper's setting (e.g. F = B-W = W); otherwise the greedy W placement does at least as well.
    f, b, w = costs
    formula = (pp - 1) * (f + b - 2 * w)
    for n in (2 * pp, 3 * pp):
        timeline = simulate(build_zb1p(pp, n, Costs(f, b, w)), Costs(f, b, w))
        if w in (0, f, b - w):
            assert timeline.bubbles() == pytest.approx([formula] * pp)
        else:
            assert max(timeline.bubbles()) <= formula + 1e-9


@pytest.mark.parametrize("costs", DUAL_COSTS)
def test_dualpipev_bubble_matches_deepseek_table(costs):
    # README: (PP/2-1)(F&B+B-3W) with PP = pipeline *stages*; DualPipeV puts 2 stages per rank,
    # so over R ranks the bubble is (R-1)(F&B+B-3W): the largest idle time of any rank (the step
    # time is makespan = busy + bubble), for any N >= 2R; a rank may idle less (odd R, fb < f + b).
    costs = Costs(*costs)
    for ranks in SIZES:
        for n in _micro_batch_counts(ranks):
            timeline = simulate(build_dualpipev(ranks, n, dw_detach=True), costs)
            want = (2 * ranks / 2 - 1) * (costs.f_and_b + costs.b - 3 * costs.w)
            assert max(timeline.bubbles()) == pytest.approx(want), (ranks, n)


@pytest.mark.parametrize("costs", DUAL_COSTS)
def test_dualpipev_without_dw_detach_pays_2w_per_rank_step(costs):
    # MindSpeed's default keeps dW inside the cooldown backwards: (R-1)(F&B+B-W) over R ranks.
    costs = Costs(*costs)
    for ranks in SIZES:
        for n in _micro_batch_counts(ranks):
            timeline = simulate(build_dualpipev(ranks, n, dw_detach=False), costs)
            want = (ranks - 1) * (costs.f_and_b + costs.b - costs.w)
            assert max(timeline.bubbles()) == pytest.approx(want), (ranks, n)


@pytest.mark.parametrize("costs", DUAL_COSTS)
def test_dualpipe_bubble_matches_deepseek_table(costs):
    costs = Costs(*costs)
    for pp in (2, 4, 6, 8):
        for n in (2 * pp, 2 * pp + 2, 4 * pp):
            timeline = simulate(build_dualpipe(pp, n, dw_detach=True), costs)
            want = (pp / 2 - 1) * (costs.f_and_b + costs.b - 3 * costs.w)
            assert max(timeline.bubbles()) == pytest.approx(want), (pp, n)


def test_dualpipev_equals_dualpipe_cut_in_half():
    # rank r of DualPipeV runs the same op kinds in the same order as rank r of DualPipe on 2R ranks
    for ranks, n in [(2, 4), (3, 8), (4, 9)]:
        v = build_dualpipev(ranks, n, dw_detach=True)
        d = build_dualpipe(2 * ranks, 2 * n, dw_detach=True)
        for r in range(ranks):
            assert [op.kind for op in v.rank_ops[r]] == [op.kind for op in d.rank_ops[r]]


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipev", "dualpipe"])
@pytest.mark.parametrize("dw_detach", [False, True])
def test_every_pass_runs_once_on_its_rank(name, dw_detach):
    pp, n = 4, 10
    schedule = build(name, pp, n, dw_detach=dw_detach, costs=Costs(1, 2, 1))
    for rank, ops in enumerate(schedule.rank_ops):
        tasks = Counter((t.kind, t.stream, t.stage, t.microbatch) for op in ops for t in op.tasks)
        assert all(count == 1 for count in tasks.values())
        owned = [(s, k) for s, row in enumerate(schedule.stage_rank) for k, r in enumerate(row) if r == rank]
        per_stream = n // len(schedule.stage_rank)
        for kind in ("F", "B"):
            assert {(s, k, m) for (x, s, k, m) in tasks if x == kind} == {(s, k, m) for s, k in owned for m in range(per_stream)}
        deferred = sum(t.kind == "B" and t.input_only for op in ops for t in op.tasks)
        assert deferred == sum(t.kind == "W" for op in ops for t in op.tasks)


def test_dw_detach_only_changes_the_cooldown():
    plain, detached = build_dualpipev(4, 8, False), build_dualpipev(4, 8, True)
    for a, b in zip(plain.rank_ops, detached.rank_ops, strict=True):
        first_fb = next(i for i, op in enumerate(a) if op.kind == "FB")
        assert a[:first_fb] == b[:first_fb]  # warm-up (with its B/W/F triples) is identical
        assert "W" not in [op.kind for op in a[first_fb:]]
        assert "W" in [op.kind for op in b[first_fb:]]


def test_deadlock_is_detected():
    stuck = Schedule("bad", 2, 1, ((0, 1),), ((Op((Task("B", 0, 0),)), Op((Task("F", 0, 0),))), (Op((Task("F", 1, 0),)),)))
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(stuck, Costs())


def test_comm_cost_delays_cross_rank_inputs():
    timeline = simulate(build_1f1b(2, 2), Costs(1, 2, 1, comm=0.5))
    assert timeline.rows[1][0][0] == 1.5  # rank 1's first forward waits for F0 (1) + comm (0.5)


def test_render_one_char_per_unit():
    text = render(simulate(build_1f1b(2, 2), Costs(1, 2, 1)))
    assert text.splitlines() == [
        "rank  0 |FF..B0.B1|",
        "rank  1 |.FB0FB1..|",
        "makespan 9; bubble per rank: 3, 3",
    ]


def test_bad_costs_and_sizes_are_reported():
    with pytest.raises(ValueError, match="Costs.w"):
        Costs(1, 1, 2)
    with pytest.raises(ValueError, match="pp="):
        build_1f1b(0, 4)
    with pytest.raises(ValueError, match="schedule="):
        build("gpipe", 2, 4)


def test_cli_prints_timeline(capsys):
    assert main(["--pp", "4", "--micro-batches", "8", "--schedule", "dualpipev", "--f", "1", "--b", "2", "--w", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[0].strip() for line in lines[:4]] == ["rank  0", "rank  1", "rank  2", "rank  3"]
    assert lines[4].startswith("makespan") and "bubble per rank" in lines[4]
    assert main(["--pp", "4", "--micro-batches", "4", "--schedule", "dualpipev"]) == 2


def test_cli_module_entry_point():
    cmd = [
        sys.executable,
        "-m",
        "mindspeed_parallel.pipeline.simulator",
        "--pp",
        "2",
        "--micro-batches",
        "4",
        "--schedule",
        "zb1p",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.splitlines()[-1].startswith("makespan")
