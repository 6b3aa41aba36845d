"""Adaptive CP (adaptive_cp_algo, hybrid_adaptive_cp_algo): the planner's properties on one
process, and attention on 2 / 4 gloo ranks equal to attention on one process.

Reference: softmax(q k^T) v in float64 on the full sequence with the full mask, written here
(a query row that sees nothing gives 0, as flash_attention does), outputs and dq/dk/dv by
autograd. float32: max abs diff <= 1e-5. bfloat16: error against the float64 reference no worse
than 2x that of single-process bf16 flash_attention on the full sequence.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from mindspeed_kernels import ops
from mindspeed_kernels.testing import assert_error_within, run_world
from mindspeed_parallel.cp.adaptive import AdaptiveOptions, AdaptivePlanner, build_plan, causal_mask
from mindspeed_parallel.cp.adaptive_attention import adaptive_attention, hybrid_adaptive_attention
from mindspeed_parallel.cp.adaptive_data import (
    adaptive_gather,
    adaptive_split,
    hybrid_adaptive_gather,
    hybrid_adaptive_indices,
    hybrid_adaptive_split,
)
from mindspeed_parallel.cp.data import zigzag_indices

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300)]

FP32_MAX_ABS = 1e-5
MASKS = ("causal", "docs", "random", "dense", "empty_row")
# the four adaptive switches; "coarse" is the default (remapping on a coarsened mask)
OPTIONS = ("coarse", "without_coarse", "only_reschedule", "dynamic", "mask_list")
BALANCE_BOUND = 1.1  # AdaptiveOptions.balance_tolerance: max / mean per-rank work after remapping


@dataclass(frozen=True)
class Case:
    mask: str
    n_kv: int  # q has 4 heads: 4 = MHA, 2 = GQA
    dtype: torch.dtype
    option: str
    batch_mask: bool = False  # a [B, 1, S, S] mask differing per batch row


# ----------------------------------------------------------------------------- masks and references


def make_mask(kind: str, seq: int, seed: int = 0) -> torch.Tensor:
    """bool [S, S], True = masked out."""
    gen = torch.Generator().manual_seed(seed)
    causal = causal_mask(seq)
    if kind == "causal":
        return causal
    if kind == "dense":
        return torch.zeros(seq, seq, dtype=torch.bool)
    if kind == "docs":  # causal documents of uneven lengths (packed sequences as a general mask)
        cuts = [0, seq * 5 // 8, seq * 3 // 4, seq]
        doc = torch.repeat_interleave(torch.arange(3), torch.diff(torch.tensor(cuts)))
        return (doc[:, None] != doc[None, :]) | causal
    mask = torch.rand(seq, seq, generator=gen) < 0.75
    mask[seq // 2 :] |= causal[seq // 2 :]  # later rows see only earlier keys: some blocks empty
    mask &= ~torch.eye(seq, dtype=torch.bool)
    if kind == "empty_row":
        mask[seq // 3] = True  # a row with nothing visible
        mask[:, seq - 2] = True  # and a key nobody sees
    return mask


def _naive(q, k, v, mask, scale):
    """softmax(scale q k^T masked) v for SBND; rows seeing nothing give 0 (and zero gradients)."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("ibnd,jbnd->bnij", q, k) * scale
    keep = ~mask
    scores = scores.masked_fill(mask, 0.0)
    e = (scores - scores.amax(-1, keepdim=True).detach()).exp() * keep
    p = e / e.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.einsum("bnij,jbnd->ibnd", p, v)


def _single_process_bf16(q, k, v, mask, scale):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    n = q.shape[2]
    out, _ = ops.flash_attention(*(t.flatten(2) for t in leaves), "SBH", 0, atten_mask=mask, scale=scale, num_heads=n)
    return out.unflatten(-1, (n, -1)), leaves


def _options(option: str, seq: int) -> AdaptiveOptions:
    coarse = seq // 2  # units of 2 tokens: the coarsening really happens on these tiny sequences
    return {
        "coarse": AdaptiveOptions(coarse_size=coarse),
        "without_coarse": AdaptiveOptions(without_coarse=True),
        "only_reschedule": AdaptiveOptions(only_reschedule=True),
        "dynamic": AdaptiveOptions(dynamic_attn_mask=True, coarse_size=coarse),
        "mask_list": AdaptiveOptions(coarse_size=coarse),
    }[option]


@contextlib.contextmanager
def _labelled(label: str):
    try:
        yield
    except AssertionError as err:
        raise AssertionError(f"{label}: {err}") from None


def _compare(label, ours, ref, low, split):
    names = ("out", "dq", "dk", "dv")
    if low is None:
        for name, a, e in zip(names, ours, ref, strict=True):
            err = (a.double() - split(e.detach())).abs().max().item()
            assert err <= FP32_MAX_ABS, f"{label}: {name} max abs diff {err:.3g} > {FP32_MAX_ABS}"
        return
    for name, a, lo, e in zip(names, ours, low, ref, strict=True):
        with _labelled(f"{label} {name}"):
            assert_error_within(a, split(lo.detach()), split(e.detach()))


def _inputs(case: Case, seq: int, index: int):
    gen = torch.Generator().manual_seed(100 + index)  # the same global tensors on every rank
    batch, heads, dim = 2, 4, 8
    q = torch.randn(seq, batch, heads, dim, generator=gen).to(case.dtype)
    k = torch.randn(seq, batch, case.n_kv, dim, generator=gen).to(case.dtype)
    v = torch.randn(seq, batch, case.n_kv, dim, generator=gen).to(case.dtype)
    gout = torch.randn(seq, batch, heads, dim, generator=gen).to(case.dtype)
    mask = make_mask(case.mask, seq, seed=index)
    if case.batch_mask:
        mask = torch.stack([mask, make_mask("random", seq, seed=index + 1)])[:, None]
    return q, k, v, gout, mask, dim**-0.5


def _references(q, k, v, gout, mask, scale, dtype):
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = _naive(*ref_in, mask, scale)
    ref = [ref_out, *torch.autograd.grad(ref_out, ref_in, gout.double())]
    if dtype == torch.float32:
        return ref, None
    low_out, low_in = _single_process_bf16(q, k, v, mask, scale)
    return ref, [low_out, *torch.autograd.grad(low_out, low_in, gout)]


# ----------------------------------------------------------------------------- adaptive_cp_algo


def _plan_for(case: Case, mask, cp: int, seq: int, planners: dict):
    """The plan as a caller would get it for the case's option (planners persist per spawn)."""
    options = _options(case.option, seq)
    if case.option == "mask_list":
        planner = AdaptivePlanner(cp, options, mask_list=[make_mask("dense", seq), mask])
        plan = planner.plan(mask.clone())
        assert (planner.hits, planner.misses) == (1, 0), "a mask of the list must not be planned again"
        return plan
    if case.option == "dynamic":
        planner = planners.setdefault("dynamic", AdaptivePlanner(cp, options))
        plan, again = planner.plan(mask), planner.plan(mask)
        assert planner.hits == 0 and plan is not again, "dynamic_attn_mask: no plan is cached"
        return plan
    planner = planners.setdefault(case.option, AdaptivePlanner(cp, options))
    plan = planner.plan(mask)
    assert planner.plan(mask.clone()) is plan, "a repeated mask hits the cache"
    return plan


def _check_case(rank: int, cp: int, group, case: Case, index: int, planners: dict) -> None:
    seq = 8 * cp
    q, k, v, gout, mask, scale = _inputs(case, seq, index)
    ref, low = _references(q, k, v, gout, mask, scale, case.dtype)
    plan = _plan_for(case, mask, cp, seq, planners)
    if cp == 4 and case.option == "only_reschedule" and case.mask in ("causal", "docs"):
        # keeps the other path covered: an idle rank computes another rank's queries (sent to it)
        assert any(t.executor != t.q_rank for t in plan.tasks), "expected an offloaded task"
    split = lambda t: adaptive_split(t, plan, rank, seq_dim=0)  # noqa: E731
    local = [split(t).requires_grad_() for t in (q, k, v)]
    out = adaptive_attention(*local, group, attention_mask=mask, plan=plan, scale=scale)
    ours = [out, *torch.autograd.grad(out, local, split(gout))]
    _compare(f"rank {rank} {case}", ours, ref, low, split)
    if index == 0:  # the gather inverts the split
        assert torch.equal(adaptive_gather(split(q), plan, group, 0), q)


def _world_cases(cp: int) -> list[Case]:
    cases = [
        Case(mask, n_kv, dtype, option)
        for mask in MASKS
        for option in OPTIONS
        for n_kv, dtype in ((4, torch.float32), (2, torch.bfloat16))
    ]
    if cp == 2:  # the other pairings of heads and dtype, once per mask
        cases += [
            Case(mask, n_kv, dtype, "coarse") for mask in MASKS for n_kv, dtype in ((2, torch.float32), (4, torch.bfloat16))
        ]
    cases += [
        Case("docs", 2, torch.float32, "coarse", batch_mask=True),
        Case("causal", 4, torch.bfloat16, "without_coarse", True),
    ]
    return cases


def world_cases(rank: int, cp: int) -> None:
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only oversubscribe the cores
    group, planners = dist.group.WORLD, {}
    for index, case in enumerate(_world_cases(cp)):
        _check_case(rank, cp, group, case, index, planners)
    # no plan: built from the mask on every rank alike; causal=True without a mask
    seq = 8 * cp
    q, k, v, gout, mask, scale = _inputs(Case("causal", 2, torch.float32, "coarse"), seq, 0)
    ref, _ = _references(q, k, v, gout, mask, scale, torch.float32)
    plan = build_plan(mask, cp)
    split = lambda t: adaptive_split(t, plan, rank, seq_dim=0)  # noqa: E731
    local = [split(t).requires_grad_() for t in (q, k, v)]
    out = adaptive_attention(*local, group, causal=True, scale=scale)
    _compare(f"rank {rank} causal=True", [out, *torch.autograd.grad(out, local, split(gout))], ref, None, split)
    _errors(group, plan, q)


def _errors(group, plan, q) -> None:
    local = adaptive_split(q, plan, dist.get_rank(group), 0)
    with pytest.raises(ValueError, match="attention_mask is required"):
        adaptive_attention(local, local, local, group)
    with pytest.raises(ValueError, match="plan is for cp="):
        adaptive_attention(local[:2], local[:2], local[:2], group, causal=True, plan=plan)
    with pytest.raises(ValueError, match="cu_seqlens"):
        adaptive_attention(local, local, local, group, causal=True, cu_seqlens=[4])
    with pytest.raises(ValueError, match=r"attention_mask has shape \(4, 4\)"):
        adaptive_attention(local, local, local, group, attention_mask=torch.zeros(4, 4, dtype=torch.bool))


@pytest.mark.slow
def test_adaptive_attention_world2():
    run_world(world_cases, 2, 2, timeout_s=120)


@pytest.mark.slow
def test_adaptive_attention_world4():
    run_world(world_cases, 4, 4, timeout_s=120)


# ----------------------------------------------------------------------------- hybrid_adaptive_cp_algo


HYBRID_CASES = [
    Case("docs", 2, torch.float32, "coarse"),
    Case("empty_row", 4, torch.float32, "only_reschedule"),
    Case("random", 1, torch.float32, "without_coarse"),
    Case("causal", 2, torch.bfloat16, "coarse"),
    Case("dense", 4, torch.bfloat16, "dynamic"),
]


def hybrid_world(rank: int, ulysses_degree: int) -> None:
    from mindspeed_parallel.cp.hybrid import make_hybrid_groups

    torch.set_num_threads(1)
    cp = dist.get_world_size()
    ulysses_group, adaptive_group = make_hybrid_groups(list(range(cp)), ulysses_degree)
    ring = cp // ulysses_degree
    seq = 8 * cp
    for index, case in enumerate(HYBRID_CASES):
        q, k, v, gout, mask, scale = _inputs(case, seq, index)
        ref, low = _references(q, k, v, gout, mask, scale, case.dtype)
        plan = build_plan(mask, ring, _options(case.option, seq))
        split = lambda t: hybrid_adaptive_split(t, plan, ulysses_degree, rank, seq_dim=0)  # noqa: E731, B023
        local = [split(t).requires_grad_() for t in (q, k, v)]
        out = hybrid_adaptive_attention(
            *local, ulysses_group=ulysses_group, adaptive_group=adaptive_group, attention_mask=mask, plan=plan, scale=scale
        )
        ours = [out, *torch.autograd.grad(out, local, split(gout))]
        _compare(f"rank {rank} hybrid {case}", ours, ref, low, split)
        if index == 0:
            assert torch.equal(hybrid_adaptive_gather(split(q), plan, dist.group.WORLD, ulysses_degree, 0), q)
    with pytest.raises(ValueError, match="adaptive_group"):
        hybrid_adaptive_attention(q, q, q, ulysses_group=ulysses_group, adaptive_group=None, causal=True)


@pytest.mark.slow
def test_hybrid_adaptive_attention_world4():
    run_world(hybrid_world, 4, 2, timeout_s=120)


# ----------------------------------------------------------------------------- the planner, one process


PLAN_OPTIONS = [
    AdaptiveOptions(),
    AdaptiveOptions(without_coarse=True),
    AdaptiveOptions(coarse_size=16),
    AdaptiveOptions(only_reschedule=True),
]


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("kind", MASKS)
def test_plan_computes_every_visible_pair_once_and_no_masked_block(kind, cp):
    seq = 64
    mask = make_mask(kind, seq)
    visible = ~mask
    for options in PLAN_OPTIONS:
        plan = build_plan(mask, cp, options)
        assert sorted(plan.order.tolist()) == list(range(seq))  # a permutation
        count = torch.zeros(seq, seq, dtype=torch.long)
        for t in plan.tasks:
            sub = visible[t.q_pos][:, t.kv_pos]
            # trimmed: every computed row sees a key, every computed key is seen, so no block is fully masked
            assert sub.any(1).all() and sub.any(0).all(), (options, t.q_rank, t.kv_rank)
            assert int(sub.sum()) == t.work
            assert t.executor in (t.q_rank, t.kv_rank)
            count[t.q_pos[:, None], t.kv_pos[None, :]] += 1
        assert (count[visible] == 1).all() and count.max() <= 1, options
        for tasks in plan.rounds:  # at most one task per rank and round
            executors = [t.executor for t in tasks]
            assert len(executors) == len(set(executors))
        assert sum(plan.owned_work()) == int(visible.sum())


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("kind", ["causal", "docs", "random", "dense"])
def test_remapping_balances_the_unmasked_work(kind, cp):
    mask = make_mask(kind, 64)
    for options in PLAN_OPTIONS[:3]:
        work = build_plan(mask, cp, options).owned_work()
        ratio = max(work) / (sum(work) / cp)
        assert ratio <= BALANCE_BOUND, f"{kind} {options}: max / mean work {ratio:.3f} > {BALANCE_BOUND}"


@pytest.mark.parametrize("kind", ["causal", "docs"])
def test_rescheduling_alone_offloads_work_and_shortens_the_schedule(kind):
    plan = build_plan(make_mask(kind, 64), 4, AdaptiveOptions(only_reschedule=True))
    assert torch.equal(plan.order, torch.arange(64))  # no remapping: the contiguous split
    assert max(plan.executed_work()) <= max(plan.owned_work())
    busiest = max(sum(t.q_rank == r for t in plan.tasks) for r in range(4))
    assert len(plan.rounds) <= busiest
    if kind == "causal":  # contiguous causal: rank r owns r + 1 blocks; idle ranks help
        assert len(plan.rounds) < busiest and max(plan.executed_work()) < max(plan.owned_work())


def test_dense_mask_keeps_the_plain_split_and_causal_gets_the_zigzag():
    seq, cp = 32, 4
    dense = build_plan(torch.zeros(seq, seq, dtype=torch.bool), cp, AdaptiveOptions(without_coarse=True))
    assert torch.equal(dense.order, torch.arange(seq)) and len(dense.tasks) == cp * cp
    causal = build_plan(causal_mask(seq), cp, AdaptiveOptions(without_coarse=True))
    for rank in range(cp):
        assert torch.equal(causal.indices(rank), zigzag_indices(seq, cp, rank))
    assert len(set(causal.owned_work())) == 1  # exactly balanced
    assert len(causal.tasks) == cp * cp  # zig-zag: every block holds visible pairs


def test_documents_skip_blocks_and_their_communication():
    seq, cp = 64, 4
    doc = torch.arange(seq) // 16  # four documents of one rank each
    mask = (doc[:, None] != doc[None, :]) | causal_mask(seq)
    plan = build_plan(mask, cp)
    assert torch.equal(plan.grid(), torch.eye(cp, dtype=torch.bool))  # only the diagonal: nothing is sent
    assert len(plan.rounds) == 1 and all(t.executor == t.q_rank == t.kv_rank for t in plan.tasks)
    # uneven documents: some cross-rank blocks are still skipped
    uneven = make_mask("docs", seq)
    assert len(build_plan(uneven, cp, AdaptiveOptions(coarse_size=16)).tasks) < cp * cp
    # random sparse mask: on the contiguous split its causal lower half empties blocks (the
    # remapping may trade them for balance: every candidate it has with skips is unbalanced)
    rand = build_plan(make_mask("random", seq), cp, AdaptiveOptions(only_reschedule=True))
    assert len(rand.tasks) < cp * cp


def test_coarsening_moves_whole_units():
    seq = 64
    plan = build_plan(make_mask("docs", seq), 4, AdaptiveOptions(coarse_size=8))  # units of 8 tokens
    units = plan.order.view(-1, 8)
    assert torch.equal(units - units[:, :1], torch.arange(8).expand(8, 8))
    assert (units[:, 0] % 8 == 0).all()


def test_batch_masks_plan_on_the_union_of_what_rows_see():
    seq = 32
    a, b = make_mask("docs", seq), make_mask("causal", seq)
    plan = build_plan(torch.stack([a, b])[:, None], 2, AdaptiveOptions(without_coarse=True))
    union = ~(a & b)
    assert sum(plan.owned_work()) == int(union.sum())


def test_planner_caches_by_mask_content():
    mask = make_mask("docs", 32)
    planner = AdaptivePlanner(2, AdaptiveOptions(), max_cached=1)
    first = planner.plan(mask)
    assert planner.plan(mask.clone()) is first and (planner.hits, planner.misses) == (1, 1)
    other = planner.plan(make_mask("causal", 32))
    assert other is not first and planner.misses == 2
    assert planner.plan(mask) is not first  # evicted (max_cached=1), planned again
    same = build_plan(mask, 2)
    assert torch.equal(same.order, first.order) and [t.executor for t in same.tasks] == [t.executor for t in first.tasks]


def test_hybrid_indices_partition_the_sequence():
    plan = build_plan(make_mask("docs", 32), 2)
    rows = [hybrid_adaptive_indices(plan, 2, r) for r in range(4)]
    assert sorted(torch.cat(rows).tolist()) == list(range(32))
    assert torch.equal(torch.cat(rows[:2]), plan.indices(0))


def test_bad_input_is_a_one_line_error():
    with pytest.raises(ValueError, match="must divide by cp_size=3"):
        build_plan(causal_mask(16), 3)
    with pytest.raises(TypeError, match="bool tensor"):
        build_plan(torch.zeros(16, 16), 2)
    with pytest.raises(ValueError, match=r"shape \(16, 8\)"):
        build_plan(torch.zeros(16, 8, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="balance_tolerance"):
        AdaptiveOptions(balance_tolerance=0.5)
    with pytest.raises(ValueError, match="cp_rank=2"):
        build_plan(causal_mask(16), 2).indices(2)
    with pytest.raises(ValueError, match="plan is for S = 16"):
        adaptive_split(torch.zeros(8, 2), build_plan(causal_mask(16), 2), 0, 0)
