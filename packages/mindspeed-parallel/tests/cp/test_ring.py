"""Ring attention (megatron_cp_algo) on 2 and 4 gloo ranks equals attention on one process.

Reference: plain softmax(q k^T) v in float64 on the full sequence, written here (outputs and
dq/dk/dv via autograd). float32: max abs diff <= 1e-5. bfloat16: error against the float64
reference no worse than 2x that of single-process bf16 flash_attention on the full sequence.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import pytest
import torch
import torch.distributed as dist

from mindspeed_kernels import ops
from mindspeed_kernels.testing import assert_close, assert_error_within, run_world
from mindspeed_parallel.cp._ring_blocks import Block, MaskSlicer, causal_blocks, make_geometry
from mindspeed_parallel.cp._ring_comm import ring_schedule
from mindspeed_parallel.cp.data import split_packed, zigzag_split
from mindspeed_parallel.cp.ring import make_double_ring_groups, ring_attention

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300)]

FP32_MAX_ABS = 1e-5


@dataclass(frozen=True)
class Case:
    mask: str  # causal | general2d | general4d | none
    n_kv: int  # 4 = MHA, 2 / 1 = GQA / MQA (q has 4 heads)
    dtype: torch.dtype
    overlap: bool = False
    window: int = 1
    tnd: bool = False
    dv: int = 8  # v's head dim (MLA-like when != 8)
    block_dtype: torch.dtype | None = None  # ring_attention's opt-in lower-precision blocks


def _world2_cases() -> list[Case]:
    cases = [
        Case(mask, n_kv, dtype, overlap)
        for mask in ("causal", "general2d", "general4d", "none")
        for n_kv in (4, 2)
        for dtype in (torch.float32, torch.bfloat16)
        for overlap in (False, True)
    ]
    cases += [Case("causal", 1, torch.float32, dv=6), Case("general2d", 2, torch.float32, True, dv=6)]
    cases += [Case(m, 2, torch.bfloat16, True, block_dtype=torch.bfloat16) for m in ("causal", "general4d")]
    cases += [
        Case(m, n, d, o, tnd=True)
        for m in ("causal", "none")
        for n, d, o in ((2, torch.float32, False), (4, torch.bfloat16, True))
    ]
    return cases


WORLD4_CASES = [
    Case("causal", 2, torch.float32, False, window=1),
    Case("causal", 2, torch.float32, True, window=2),
    Case("causal", 4, torch.bfloat16, True, window=2),
    Case("general4d", 2, torch.float32, False, window=2),
    Case("general2d", 4, torch.bfloat16, False, window=1),
    Case("none", 1, torch.float32, True, window=2),
    Case("causal", 2, torch.float32, True, window=2, tnd=True),
    Case("none", 2, torch.bfloat16, False, window=1, tnd=True),
]


# ----------------------------------------------------------------------------- references


def _naive(q, k, v, mask, scale):
    """softmax(scale q k^T masked) v for SBND tensors; mask bool broadcastable to [B, N, S, S]."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("ibnd,jbnd->bnij", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.einsum("bnij,jbnd->ibnd", scores.softmax(-1), v)


def _global_mask(case: Case, seq: int, batch: int, cu: list[int] | None, gen) -> torch.Tensor | None:
    """The full-sequence mask (True = masked) the case means."""
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    if case.tnd:
        doc = torch.repeat_interleave(torch.arange(len(cu)), torch.diff(torch.tensor([0] + cu)))
        other_doc = doc[:, None] != doc[None, :]
        return other_doc | causal if case.mask == "causal" else other_doc
    if case.mask == "causal":
        return causal
    if case.mask == "none":
        return None
    shape = (seq, seq) if case.mask == "general2d" else (batch, 1, seq, seq)
    mask = torch.rand(shape, generator=gen) < 0.6
    # some rows see only earlier keys, so whole blocks are masked and skipped
    mask[..., seq // 2 :, :] |= causal[seq // 2 :]
    return mask & ~torch.eye(seq, dtype=torch.bool)  # every query sees itself


def _single_process_low(q, k, v, case: Case, mask, cu, scale):
    """bf16 flash_attention on the full sequence (the no-CP baseline) and its grads."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    if case.tnd:
        mode = 3 if case.mask == "causal" else 0
        out, _ = ops.flash_attention(*leaves, "TND", mode, scale=scale, actual_seq_qlen=cu, actual_seq_kvlen=cu)
        return out, leaves
    mode, atten = (3, None) if case.mask == "causal" else (0, mask)
    n = q.shape[2]
    out, _ = ops.flash_attention(*(t.flatten(2) for t in leaves), "SBH", mode, atten_mask=atten, scale=scale, num_heads=n)
    return out.unflatten(-1, (n, -1)), leaves


@contextlib.contextmanager
def _labelled(label: str):
    try:
        yield
    except AssertionError as err:
        raise AssertionError(f"{label}: {err}") from None


def _check_case(rank: int, cp: int, group, case: Case, index: int, groups) -> None:
    gen = torch.Generator().manual_seed(1000 + index)  # same global tensors on every rank
    batch, heads, dim, chunk = 2, 4, 8, 3
    cu = [4 * cp, 8 * cp, 10 * cp] if case.tnd else None  # sequence lengths divisible by 2 * cp
    seq = cu[-1] if case.tnd else 2 * cp * chunk
    lead = (seq,) if case.tnd else (seq, batch)
    q = torch.randn(*lead, heads, dim, generator=gen).to(case.dtype)
    k = torch.randn(*lead, case.n_kv, dim, generator=gen).to(case.dtype)
    v = torch.randn(*lead, case.n_kv, case.dv, generator=gen).to(case.dtype)
    gout = torch.randn(*lead, heads, case.dv, generator=gen).to(case.dtype)
    mask = _global_mask(case, seq, batch, cu, gen)
    scale = dim**-0.5

    # float64 reference on the full sequence (TND as one batch row with a document mask)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    unsq = (lambda t: t.unsqueeze(1)) if case.tnd else (lambda t: t)
    ref_out = _naive(*(unsq(t) for t in ref_in), mask, scale)
    ref_out = ref_out.squeeze(1) if case.tnd else ref_out
    ref = [ref_out, *torch.autograd.grad(ref_out, ref_in, gout.double())]

    if case.tnd:
        local_cu = [c // cp for c in cu]
        split = lambda t: split_packed(t, cu, cp, rank, zigzag=True)[0]
    else:
        local_cu = None
        split = lambda t: zigzag_split(t, cp, rank, seq_dim=0)
    local = [split(t).requires_grad_() for t in (q, k, v)]
    kw = dict(causal=case.mask == "causal", scale=scale, cu_seqlens=local_cu, send_recv_overlap=case.overlap)
    kw["block_dtype"] = case.block_dtype
    if case.mask.startswith("general"):
        kw["attention_mask"] = mask
    if case.window > 1:
        kw.update(window_size=case.window, inner_group=groups[0], outer_group=groups[1])
    out = ring_attention(*local, group, **kw)
    ours = [out, *torch.autograd.grad(out, local, split(gout))]

    label = f"rank {rank} {case}"
    names = ("out", "dq", "dk", "dv")
    if case.dtype == torch.float32:
        for name, a, e in zip(names, ours, ref, strict=True):
            err = (a.double() - split(e.detach())).abs().max().item()
            assert err <= FP32_MAX_ABS, f"{label}: {name} max abs diff {err:.3g} > {FP32_MAX_ABS}"
        return
    if case.block_dtype == torch.bfloat16:  # documented as less exact: the bf16 tolerance of every op
        for name, a, e in zip(names, ours, ref, strict=True):
            with _labelled(f"{label} {name}"):
                assert_close(a, split(e.detach()))
        return
    low_out, low_in = _single_process_low(q, k, v, case, mask, cu, scale)
    low = [low_out, *torch.autograd.grad(low_out, low_in, gout)]
    for name, a, lo, e in zip(names, ours, low, ref, strict=True):
        with _labelled(f"{label} {name}"):
            assert_error_within(a, split(lo.detach()), split(e.detach()))


def _errors(rank: int, group) -> None:
    """Bad input: one-line ValueErrors naming the parameter."""
    q = torch.randn(6, 1, 2, 4)
    with pytest.raises(ValueError, match="odd"):
        ring_attention(q[:5], q[:5], q[:5], group)
    with pytest.raises(ValueError, match="window_size=2 must be less than the cp size"):
        ring_attention(q, q, q, group, window_size=2)
    with pytest.raises(ValueError, match="causal=False"):
        ring_attention(q, q, q, group, attention_mask=torch.zeros(12, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(6, 6\)"):
        ring_attention(q, q, q, group, causal=False, attention_mask=torch.zeros(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="cu_seqlens"):
        ring_attention(q[:, 0], q[:, 0], q[:, 0], group, cu_seqlens=[2, 5])
    with pytest.raises(ValueError, match="must be even"):
        ring_attention(q[:, 0], q[:, 0], q[:, 0], group, cu_seqlens=[3, 6])


def world_cases(rank: int, cp: int, cases: list[dict]) -> None:
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only oversubscribe the cores
    group = dist.group.WORLD
    groups = make_double_ring_groups(list(range(cp)), 2) if cp >= 4 else (None, None)
    for index, case in enumerate(cases):
        _check_case(rank, cp, group, Case(**case), index, groups)
    if cp == 2:
        _errors(rank, group)
    else:
        q = torch.randn(4, 1, 2, 4)
        with pytest.raises(ValueError, match="window_size=3 does not divide"):
            ring_attention(q, q, q, group, window_size=3)
        with pytest.raises(ValueError, match="inner_group has ranks"):  # swapped groups
            ring_attention(q, q, q, group, window_size=2, inner_group=groups[1], outer_group=groups[0])
        with pytest.raises(ValueError, match="inner_group is None"):
            ring_attention(q, q, q, group, window_size=2)


@pytest.mark.slow
def test_ring_attention_world2():
    # plain dicts: a Case would be pickled under pytest's name for this module, which the
    # spawned children (they load the file under another name) cannot import
    run_world(world_cases, 2, 2, [asdict(c) for c in _world2_cases()], timeout_s=120)


@pytest.mark.slow
def test_ring_attention_world4():
    run_world(world_cases, 4, 4, [asdict(c) for c in WORLD4_CASES], timeout_s=120)


# ----------------------------------------------------------------------------- single process


@pytest.mark.parametrize("cp,window", [(2, 2), (4, 4), (4, 2), (8, 2), (8, 4), (6, 3), (6, 2), (4, 1)])
def test_schedule_visits_every_block_once_along_inner_then_outer_hops(cp, window):
    sched = ring_schedule(cp, window)
    assert len(sched.held) == cp and len(sched.moves) == cp - 1
    for rank in range(cp):
        assert sorted(step[rank] for step in sched.held) == list(range(cp))
    for move in sched.moves:
        for rank in range(cp):
            nxt = sched.next(rank, move)
            assert sched.prev(nxt, move) == rank
            same_window = nxt // window == rank // window
            assert same_window == (move == "inner") or cp == window


def _visible_pairs(blocks: list[Block], q_pos, kv_pos):
    pairs = set()
    for b in blocks:
        for i in q_pos[b.q.sel].tolist():
            pairs |= {(i, j) for j in kv_pos[b.kv.sel].tolist()}
    return pairs


@pytest.mark.parametrize("cp", [2, 4])
def test_causal_blocks_cover_exactly_the_visible_pairs_and_are_never_fully_masked(cp):
    from mindspeed_parallel.cp.data import zigzag_indices

    seq = 4 * cp
    geom = make_geometry(torch.empty(seq // cp), None)
    for rank in range(cp):
        q_pos = zigzag_indices(seq, cp, rank)
        for src in range(cp):
            kv_pos = zigzag_indices(seq, cp, src)
            blocks = causal_blocks(geom, rank, src)
            visible = {(i, j) for i in q_pos.tolist() for j in kv_pos.tolist() if j <= i}
            computed = _visible_pairs(blocks, q_pos, kv_pos)
            assert visible <= computed  # nothing visible is left out
            for b in blocks:  # each block has visible pairs in every row and column
                qs, ks = q_pos[b.q.sel], kv_pos[b.kv.sel]
                assert (ks[None, :] <= qs[:, None]).any(1).all() and (ks[None, :] <= qs[:, None]).any(0).all()
            if src != rank:  # and off the diagonal, every computed pair is visible
                assert computed == visible


def test_general_mask_skips_fully_masked_blocks_and_trims_halves():
    cp, seq = 4, 16
    geom = make_geometry(torch.empty(seq // cp), None)
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    for rank in range(cp):
        slicer = MaskSlicer(causal, cp, rank, geom, torch.device("cpu"))
        for src in range(cp):
            got = [(b.q, b.kv) for b in slicer.blocks(src)]
            assert got == [(b.q, b.kv) for b in causal_blocks(geom, rank, src)]  # a causal mask trims like causal
        diagonal_only = ~torch.eye(seq, dtype=torch.bool)
        slicer = MaskSlicer(diagonal_only, cp, rank, geom, torch.device("cpu"))
        assert [len(slicer.blocks(src)) for src in range(cp)] == [int(src == rank) for src in range(cp)]
