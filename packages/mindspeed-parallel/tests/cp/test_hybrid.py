"""Hybrid CP (Ulysses x ring) == single-process attention on the full sequence.

Same references and cases machinery as test_ulysses (a float64 softmax(q k^T) v with explicit
GQA head mapping; bf16 within 2x the single-process bf16 error), with the sequence split by
`hybrid_split` (zig-zag over the ring, contiguous over Ulysses) and ring attention inside.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mindspeed_kernels.testing import run_world
from mindspeed_parallel.cp.hybrid import (
    hybrid_attention,
    hybrid_gather,
    hybrid_gather_packed,
    hybrid_indices,
    hybrid_packed_indices,
    hybrid_split,
    hybrid_split_packed,
    make_hybrid_groups,
)

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300)]


def _load_helpers():
    """test_ulysses's references and case runner (tests here are not an importable package)."""
    name = "_cp_test_ulysses_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("test_ulysses.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


H = _load_helpers()
Case = H.Case


def hybrid_world(rank: int, plan: list[tuple[int, bool, list[dict]]]):
    """For each (ulysses_degree, send_recv_overlap, cases) in ``plan``: every case."""
    for ulysses_degree, overlap, cases in plan:
        groups = make_hybrid_groups(list(range(dist.get_world_size())), ulysses_degree)
        _check_cases(rank, ulysses_degree, overlap, groups, cases)


def _check_cases(rank, ulysses_degree, overlap, groups, cases):
    world = dist.get_world_size()
    ulysses_group, ring_group = groups
    ring_degree = world // ulysses_degree
    assert dist.get_world_size(ulysses_group) == ulysses_degree and dist.get_world_size(ring_group) == ring_degree
    # MindSpeed's numbering: Ulysses groups are consecutive ranks, ring groups stride u.
    assert dist.get_rank(ulysses_group) == rank % ulysses_degree and dist.get_rank(ring_group) == rank // ulysses_degree
    for case in map(lambda c: Case(**c), cases):
        mask = H.make_inputs(case)[4] if case.mask.startswith("general") else None

        def attention(q, k, v, cu, case=case, mask=mask):
            return hybrid_attention(
                q, k, v, ulysses_group=ulysses_group, ring_group=ring_group, causal=case.mask == "causal",
                attention_mask=mask, kv_head_repeat=case.repeat, cu_seqlens=cu, send_recv_overlap=overlap,
            )  # fmt: skip

        if case.packed:
            ends = list(H.PACKED_ENDS)
            split = lambda x: hybrid_split_packed(x, ends, ulysses_degree, ring_degree, rank)[0]  # noqa: E731
            gather = lambda t: hybrid_gather_packed(t, ends, dist.group.WORLD, ulysses_degree)  # noqa: E731
        else:
            split = lambda x: hybrid_split(x, ulysses_degree, ring_degree, rank, seq_dim=0)  # noqa: E731
            gather = lambda t: hybrid_gather(t, dist.group.WORLD, ulysses_degree, seq_dim=0)  # noqa: E731
        H.check_case(case, attention, split, gather, H.local_cu_seqlens(case, world))


def _cases() -> list[Case]:
    cases = []
    for dtype in ("fp32", "bf16"):
        for mask in ("causal", "general", "none"):
            cases.append(Case(f"mha-{mask}-{dtype}", 4, 4, mask, dtype))
        cases.append(Case(f"gqa-causal-{dtype}", 6, 3, "causal", dtype))  # Nkv=3 not divisible by u=2: repeat
        cases.append(Case(f"packed-gqa-causal-{dtype}", 4, 2, "causal", dtype, packed=True))
    cases += [
        Case("gqa-general", 6, 3, "general"),
        Case("mqa-none", 4, 1, "none"),
        Case("gqa-no-repeat", 4, 2, "causal", repeat=False),  # Nkv == u: no repeat needed
        Case("general4d-mla-dv", 4, 2, "general4d", dv=6),
        Case("packed-mqa-none", 4, 1, "none", packed=True, cu_tensor=True),
    ]
    return cases


@pytest.mark.slow
def test_hybrid_matches_single_process_world4():
    """u=2 x ring=2 on every case; the degenerate factorisations u=1 x ring=4 (pure ring) and
    u=4 x ring=1 (pure Ulysses) on a few, with send/recv overlap on (one spawn: start-up dominates)."""
    few = [Case("gqa-causal", 8, 2, "causal"), Case("mha-general", 4, 4, "general")]
    plan = [
        (2, False, [asdict(c) for c in _cases()]),
        (1, True, [asdict(c) for c in few]),
        (4, True, [asdict(c) for c in [*few, Case("packed-gqa-none", 4, 2, "none", packed=True)]]),
    ]
    run_world(hybrid_world, 4, plan, timeout_s=150)


def test_hybrid_indices_layout():
    # S=16 in 2R=4 zig-zag chunks of 4: ring 0 holds chunks 0 and 3, ring 1 chunks 1 and 2;
    # each ring-local sequence is then cut in u=2 contiguous halves.
    expected = [range(0, 4), range(12, 16), range(4, 8), range(8, 12)]
    for cp_rank, rows in enumerate(expected):
        assert hybrid_indices(16, 2, 2, cp_rank).tolist() == list(rows)
    x = torch.arange(32).reshape(2, 16)
    assert hybrid_split(x, 2, 2, 1, seq_dim=1).tolist() == [list(range(12, 16)), list(range(28, 32))]


def test_hybrid_packed_indices_layout():
    # Sequences of 8 and 4 tokens, R=2, u=2: per sequence, zig-zag over the ring then halves.
    rows, cu = hybrid_packed_indices([8, 12], 2, 2, 1)
    assert rows.tolist() == [6, 7, 11] and cu == [2, 3]
    x, cu_t = hybrid_split_packed(torch.arange(12), torch.tensor([8, 12]), 2, 2, 1)
    assert x.tolist() == [6, 7, 11] and cu_t.tolist() == [2, 3]


def test_hybrid_bad_arguments():
    with pytest.raises(ValueError, match="cp_rank=4"):
        hybrid_indices(16, 2, 2, 4)
    with pytest.raises(ValueError, match="divisible by 2 \\* cp_size"):
        hybrid_indices(12, 1, 4, 0)
    with pytest.raises(ValueError, match="ulysses_degree=3"):
        make_hybrid_groups([0, 1, 2, 3], 3)
    q = torch.zeros(4, 1, 2, 8)
    with pytest.raises(ValueError, match="ring_group"):
        hybrid_attention(q, q, q, ulysses_group=None, ring_group=None)
