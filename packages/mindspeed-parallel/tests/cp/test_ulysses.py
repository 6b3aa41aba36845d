"""Ulysses CP == single-process attention on the full sequence (outputs and dq/dk/dv).

The reference is a plain float64 softmax(q k^T) v written here, with the GQA head mapping
(query head h -> kv head h // (Nq // Nkv)) spelled out, on the same (rounded) inputs. fp32 must
match it within 1e-5; bf16 must be no worse than 2x the single-process bf16 attention's error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import pytest
import torch
import torch.distributed as dist

from mindspeed_kernels.testing import assert_error_within, run_world
from mindspeed_parallel.cp.ulysses import kv_repeat_factor, local_attention, ulysses_attention

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300)]

S, B, D = 16, 2, 8
PACKED_LENS = (8, 4, 12)  # each divides by 2, 4 and 2 * 2 (hybrid u=2 x ring=2)
PACKED_ENDS = tuple(sum(PACKED_LENS[: i + 1]) for i in range(len(PACKED_LENS)))
FP32_ATOL = 1e-5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    name: str
    nq: int
    nkv: int
    mask: str = "causal"  # causal | general | general4d | none
    dtype: str = "fp32"
    packed: bool = False
    repeat: bool = True
    dv: int = D
    cu_tensor: bool = False  # pass cu_seqlens as an int32 tensor instead of a list


def naive_attention(q, k, v, mask: str, full_mask=None):
    """float64 reference on SBND q [S, B, Nq, D], k/v [S, B, Nkv, *]: explicit loops over heads."""
    nq, nkv = q.shape[2], k.shape[2]
    outs = []
    for h in range(nq):
        kh = h // (nq // nkv)
        scores = torch.einsum("ibd,jbd->bij", q[:, :, h], k[:, :, kh]) / math.sqrt(q.shape[-1])
        masked = _mask_tensor(mask, full_mask, q.shape[0], q.device)
        if masked is not None:
            scores = scores.masked_fill(masked.reshape(-1, *masked.shape[-2:]), float("-inf"))
        outs.append(torch.einsum("bij,jbd->ibd", torch.softmax(scores, dim=-1), v[:, :, kh]))
    return torch.stack(outs, dim=2)


def _mask_tensor(mask, full_mask, s, device):
    if mask == "causal":
        return torch.ones(s, s, dtype=torch.bool, device=device).triu(1)
    if mask == "none":
        return None
    return full_mask[..., :s, :s]


def naive_packed(q, k, v, lens, mask: str, full_mask=None):
    """TND reference: every sequence on its own (masks apply per sequence, top-left corner)."""
    outs, start = [], 0
    for n in lens:
        sl = slice(start, start + n)
        outs.append(naive_attention(q[sl, None], k[sl, None], v[sl, None], mask, full_mask)[:, 0])
        start += n
    return torch.cat(outs)


def make_inputs(case: Case, seed: int = 0):
    """Full-sequence q, k, v, upstream grad and mask, rounded to the case's dtype."""
    gen = torch.Generator().manual_seed(seed)
    lead = (sum(PACKED_LENS),) if case.packed else (S, B)
    s = max(PACKED_LENS) if case.packed else S
    dtype = DTYPES[case.dtype]
    q, k, v, g = (
        torch.randn(*lead, n, d, generator=gen, dtype=torch.float64).to(dtype)
        for n, d in ((case.nq, D), (case.nkv, D), (case.nkv, case.dv), (case.nq, case.dv))
    )
    full_mask = torch.rand(B if case.mask == "general4d" else 1, 1, s, s, generator=gen) < 0.4
    full_mask &= ~torch.eye(s, dtype=torch.bool)  # every row keeps its diagonal: no empty row
    if case.mask == "general" or case.packed:
        full_mask = full_mask[0, 0]
    return q, k, v, g, full_mask


def attention_with_grads(fn, q, k, v, g, dtype):
    """out and (dq, dk, dv) of ``fn`` for inputs cast to ``dtype`` and loss sum(out * g)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    (out.to(torch.float64) * g.to(torch.float64)).sum().backward()
    return [out.detach(), *(t.grad for t in leaves)]


def reference(case: Case, q, k, v, g, full_mask):
    if case.packed:
        return attention_with_grads(lambda *t: naive_packed(*t, PACKED_LENS, case.mask, full_mask), q, k, v, g, torch.float64)
    return attention_with_grads(lambda *t: naive_attention(*t, case.mask, full_mask), q, k, v, g, torch.float64)


def single_process(case: Case, q, k, v, g, full_mask):
    fn = _attn_fn(case, full_mask)
    cu = list(PACKED_ENDS) if case.packed else None
    return attention_with_grads(lambda *t: fn(*t, cu_seqlens=cu), q, k, v, g, DTYPES[case.dtype])


def _attn_fn(case: Case, full_mask):
    causal = case.mask == "causal"
    return local_attention(causal=causal, attention_mask=None if causal or case.mask == "none" else full_mask)


def split_local(x, case: Case, size: int, rank: int):
    """This rank's contiguous share: chunk ``rank`` of the sequence (of every sequence when packed)."""
    if not case.packed:
        return x.chunk(size, dim=0)[rank]
    return torch.cat([seq.chunk(size, dim=0)[rank] for seq in x.split(list(PACKED_LENS))])


def gather_local(local, case: Case, group):
    """Inverse of `split_local` across ``group`` (plain all_gather, test-side)."""
    size = dist.get_world_size(group)
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if not case.packed:
        return torch.cat(parts)
    local_lens = [n // size for n in PACKED_LENS]
    per_rank = [p.split(local_lens) for p in parts]
    return torch.cat([per_rank[r][j] for j in range(len(local_lens)) for r in range(size)])


def check_case(case: Case, distributed_fn, split, gather, local_cu=None):
    """Run ``distributed_fn(q, k, v, local_cu)`` on this rank's share (``split(x)``), gather the
    results (``gather(t)``) and compare them with the float64 reference (and, for bf16, with the
    single-process bf16 attention's error)."""
    q, k, v, g, full_mask = make_inputs(case)
    exact = reference(case, q, k, v, g, full_mask)
    local = [split(t) for t in (q, k, v, g)]
    got = attention_with_grads(lambda *t: distributed_fn(*t, local_cu), *local[:3], local[3], DTYPES[case.dtype])
    got = [gather(t) for t in got]
    where = f"{case.name} world {dist.get_world_size()}"
    if case.dtype == "fp32":
        for label, ours, ref in zip(("out", "dq", "dk", "dv"), got, exact, strict=True):
            err = (ours.double() - ref).abs().max().item()
            assert err <= FP32_ATOL, f"{where}: {label} max abs diff {err:.3g} > {FP32_ATOL}"
    else:
        low = single_process(case, q, k, v, g, full_mask)
        for label, ours, naive, ref in zip(("out", "dq", "dk", "dv"), got, low, exact, strict=True):
            try:
                assert_error_within(ours, naive, ref, factor=2.0)
            except AssertionError as err:
                raise AssertionError(f"{where}: {label}: {err}") from err


def local_cu_seqlens(case: Case, cp: int):
    """Local cumulative ends (global / cp) as the case asks: list, int32 tensor or None."""
    if not case.packed:
        return None
    ends = [end // cp for end in PACKED_ENDS]
    return torch.tensor(ends, dtype=torch.int32) if case.cu_tensor else ends


def ulysses_world(rank: int, cases: list[dict]):
    group, size = dist.group.WORLD, dist.get_world_size()
    for case in map(lambda c: Case(**c), cases):
        fn = _attn_fn(case, make_inputs(case)[4])
        local_cu = local_cu_seqlens(case, size)
        check_case(
            case,
            lambda q, k, v, cu: ulysses_attention(q, k, v, group, attn_fn=fn, kv_head_repeat=case.repeat, cu_seqlens=cu),
            lambda x: split_local(x, case, size, rank),
            lambda t: gather_local(t, case, group),
            local_cu,
        )
    # Nkv not divisible by the degree with the repeat off is refused before any communication.
    q, kv = torch.zeros(S // 2, B, 4, D), torch.zeros(S // 2, B, 1, D)
    with pytest.raises(ValueError, match="kv_head_repeat_before_uly_alltoall"):
        ulysses_attention(q, kv, kv, group, attn_fn=local_attention(), kv_head_repeat=False)
    with pytest.raises(ValueError, match="cu_seqlens"):  # local ends must stop at T_local
        ulysses_attention(q[:, 0], q[:, 0], q[:, 0], group, attn_fn=local_attention(), cu_seqlens=[3, 7])


def _cases(degree: int) -> list[Case]:
    gqa_nq, gqa_nkv = (6, 3) if degree == 2 else (8, 2)  # Nkv not divisible by the degree: repeat 2x
    cases = []
    for dtype in ("fp32", "bf16"):
        for mask in ("causal", "general", "none"):
            # World 4 (slowest: 4 processes on few cores) runs bf16 on the GQA causal/general pair only.
            if dtype == "fp32" or degree == 2 or mask == "causal":
                cases.append(Case(f"mha-{mask}-{dtype}", 4, 4, mask, dtype))
            if dtype == "fp32" or degree == 2 or mask != "none":
                cases.append(Case(f"gqa-{mask}-{dtype}", gqa_nq, gqa_nkv, mask, dtype))
        cases.append(Case(f"mqa-causal-{dtype}", 4, 1, "causal", dtype))
        cases.append(Case(f"packed-gqa-causal-{dtype}", gqa_nq, gqa_nkv, "causal", dtype, packed=True))
    cases += [
        Case("gqa-no-repeat-needed", 8, degree, "causal", repeat=False),  # Nkv == degree: works without repeat
        Case("general4d-mla-dv", 4, 2, "general4d", dv=6),
        Case("packed-mha-none", 4, 4, "none", packed=True, cu_tensor=True),
        Case("packed-mqa-general", 4, 1, "general", packed=True),
    ]
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_matches_single_process(world):
    run_world(ulysses_world, world, [asdict(c) for c in _cases(world)], timeout_s=120)


@pytest.mark.parametrize(
    "nq, nkv, degree, expected",
    [(8, 8, 4, 1), (8, 4, 4, 1), (8, 2, 4, 2), (8, 1, 4, 4), (6, 3, 2, 2), (12, 3, 4, 4), (32, 8, 16, 2), (16, 2, 8, 4)],
)
def test_kv_repeat_factor(nq, nkv, degree, expected):
    r = kv_repeat_factor(nq, nkv, degree)
    assert r == expected and (nkv * r) % degree == 0 and (nq // nkv) % r == 0


def test_head_errors_name_the_parameter():
    with pytest.raises(ValueError, match="kv_head_repeat_before_uly_alltoall"):
        kv_repeat_factor(8, 2, 4, kv_head_repeat=False)
    with pytest.raises(ValueError, match="num_attention_heads=6 must divide by the ulysses degree 4"):
        kv_repeat_factor(6, 6, 4)
    with pytest.raises(ValueError, match="num_query_groups=3"):
        kv_repeat_factor(8, 3, 2)
    with pytest.raises(ValueError, match="causal=False"):
        local_attention(causal=True, attention_mask=torch.zeros(4, 4, dtype=torch.bool))


@pytest.mark.parametrize("case", [Case("sbnd-gqa", 6, 2, "causal"), Case("sbnd-general", 4, 4, "general4d", dv=6),
                                  Case("tnd-mqa", 4, 1, "causal", packed=True)], ids=lambda c: c.name)  # fmt: skip
def test_local_attention_matches_naive(case):
    q, k, v, g, full_mask = make_inputs(case, seed=1)
    got = single_process(case, q, k, v, g, full_mask)
    for ours, ref in zip(got, reference(case, q, k, v, g, full_mask), strict=True):
        assert (ours.double() - ref).abs().max().item() <= FP32_ATOL
