"""ring_attention_update (reference backend): the keys of one attention problem are split into two
disjoint sets, a naive formula written here gives (out_i, lse_i) on each, and the merge must
equal the naive formula over all keys, in value and in gradient."""

from __future__ import annotations

import math

import pytest
import torch

from mindspeed_kernels.ops import flash_attention, ring_attention_update
from mindspeed_kernels.testing import assert_close, assert_error_within

LAYOUTS = ("SBH", "BSH", "BSND", "BNSD", "TND")
B, N, SQ, SKV, D = 2, 3, 7, 9, 4


def naive_bnsd(q, k, v, masked):
    """out [B, N, Sq, D], lse [B, N, Sq] over the keys not masked (True = masked)."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    masked = masked.expand_as(s)
    s = s.masked_fill(masked, torch.finfo(s.dtype).min)
    p = torch.softmax(s, -1) * ~masked
    return p @ v, torch.where(masked.all(-1), -math.inf, torch.logsumexp(s, -1))


def to_layout(out, lse, layout):
    """[B, N, S, D] / [B, N, S] -> the op's layout (TND packs the batch's sequences back to back)."""
    b, n, s, d = out.shape
    if layout == "TND":
        return out.permute(0, 2, 1, 3).reshape(b * s, n, d), lse.permute(0, 2, 1).reshape(b * s, n)
    if layout == "BSND":
        return out.permute(0, 2, 1, 3), lse
    if layout == "BSH":
        return out.permute(0, 2, 1, 3).reshape(b, s, n * d), lse
    if layout == "SBH":
        return out.permute(2, 0, 1, 3).reshape(s, b, n * d), lse
    return out, lse


def problem(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    q, k, v = rnd(B, N, SQ, D), rnd(B, N, SKV, D), rnd(B, N, SKV, D)
    # bottom-right causal; query row 0 sees no key at all (lse -inf on both sides)
    i, j = torch.arange(SQ)[:, None], torch.arange(SKV)[None, :]
    base = (j > i + SKV - SQ) | (i == 0)
    first = torch.rand(SKV, generator=gen) < 0.5  # a random disjoint split of the keys
    first[-1], first[0] = True, False
    return (q, k, v), base, first


def split_and_merge(inputs, base, first, layout, out_dtype=torch.float32):
    """Naive attention (float64) on each key set, handed to the op as flash attention would
    (out in ``out_dtype``, lse float32); also the naive result over all keys."""
    q, k, v = inputs
    out_a, lse_a = naive_bnsd(q, k, v, base | ~first)
    out_b, lse_b = naive_bnsd(q, k, v, base | first)
    out_a, out_b, lse_a, lse_b = out_a.to(out_dtype), out_b.to(out_dtype), lse_a.float(), lse_b.float()
    prev, cur = to_layout(out_a, lse_a, layout), to_layout(out_b, lse_b, layout)
    merged = ring_attention_update(prev[0], prev[1], cur[0], cur[1], layout)
    return merged, to_layout(*naive_bnsd(q, k, v, base), layout)


def finite(x):
    return torch.where(torch.isfinite(x), x, 0.0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_merge_equals_attention_over_all_keys(layout):
    inputs, base, first = problem()
    (out, lse), (ref_out, ref_lse) = split_and_merge(inputs, base, first, layout)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert torch.isinf(ref_lse).any()  # query row 0 sees no key in either set
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert (out.detach()[finite(ref_out) == 0] == 0).all() and torch.isfinite(out).all()
    # the merge computes in float32, so compare at float32 tolerance
    assert_close(out, ref_out, torch.float32)
    assert_close(lse, ref_lse, torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_through_merge(layout):
    inputs, base, first = problem()
    (out, lse), (ref_out, ref_lse) = split_and_merge(inputs, base, first, layout)
    gen = torch.Generator().manual_seed(5)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    loss = lambda o, ls: (o * g_out.to(o.dtype)).sum() + (finite(ls) * g_lse.to(ls.dtype)).sum()
    ours = torch.autograd.grad(loss(out, lse), inputs)
    ref = torch.autograd.grad(loss(ref_out, ref_lse), inputs)
    for a, b in zip(ours, ref, strict=True):
        assert torch.isfinite(a).all()
        assert_close(a, b, torch.float32)


def test_both_lse_minus_inf_gives_zero_and_finite_gradients():
    out_a, out_b = torch.randn(2, 3, 1, 4, requires_grad=True), torch.randn(2, 3, 1, 4, requires_grad=True)
    lse_a = torch.tensor([[[-math.inf], [0.5], [-math.inf]]] * 2, requires_grad=True)
    lse_b = torch.tensor([[[-math.inf], [-math.inf], [1.0]]] * 2, requires_grad=True)
    out, lse = ring_attention_update(out_a, lse_a, out_b, lse_b, "BNSD")
    assert (out[:, 0] == 0).all() and (lse[:, 0] == -math.inf).all()
    assert torch.equal(out[:, 1], out_a[:, 1]) and torch.equal(out[:, 2], out_b[:, 2])
    (out.sum() + finite(lse).sum()).backward()
    for t in (out_a, out_b, lse_a, lse_b):
        assert torch.isfinite(t.grad).all()
    assert (out_a.grad[:, 0] == 0).all() and (lse_a.grad[:, 0] == 0).all()


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
    args = (rnd(5, 2, 6), rnd(2, 3, 5), rnd(5, 2, 6), rnd(2, 3, 5))  # SBH: [S, B, N * D], lse [B, N, S]
    assert all(t.dtype == torch.float64 for t in ring_attention_update(*args, "SBH"))  # float64 in, float64 math
    assert torch.autograd.gradcheck(lambda *a: ring_attention_update(*a, "SBH"), args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parts(dtype):
    """Half-precision partial outputs merged in float32: error vs the exact merge at most twice that
    of the same formula evaluated in the low dtype; the output keeps prev_out's dtype."""
    inputs, base, first = problem()
    (out, lse), (ref_out, _) = split_and_merge(inputs, base, first, "BSH", out_dtype=dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32
    q, k, v = inputs
    out_a, lse_a = naive_bnsd(q, k, v, base | ~first)
    out_b, lse_b = naive_bnsd(q, k, v, base | first)
    lse_low = torch.logaddexp(lse_a, lse_b).to(dtype)
    w = lambda ls: torch.where(torch.isinf(lse_low), 0.0, torch.exp(ls.to(dtype) - lse_low)).unsqueeze(-1)
    low = out_a.to(dtype) * w(lse_a) + out_b.to(dtype) * w(lse_b)
    assert_error_within(out, to_layout(low, lse_a, "BSH")[0], ref_out)


def test_running_result_stays_float32():
    prev, cur = torch.randn(4, 2, 6), torch.randn(4, 2, 6).to(torch.bfloat16)
    out, lse = ring_attention_update(prev, torch.randn(2, 3, 4), cur, torch.randn(2, 3, 4), "SBH")
    assert out.dtype == torch.float32 and lse.dtype == torch.float32


def test_composes_with_flash_attention():
    """Ring CP step: flash attention over two key chunks, merged, equals flash attention over all
    keys and so the naive formula, including gradients through flash attention's lse."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, s, N, D, generator=gen, dtype=torch.float64).requires_grad_() for s in (SQ, SKV, SKV))
    parts = [flash_attention(q, k[:, a:b], v[:, a:b], "BSND") for a, b in ((0, 4), (4, SKV))]
    out, lse = ring_attention_update(parts[0][0], parts[0][1], parts[1][0], parts[1][1], "BSND")
    q4, k4, v4 = (x.transpose(1, 2) for x in (q, k, v))
    ref_out, ref_lse = naive_bnsd(q4, k4, v4, torch.zeros(SQ, SKV, dtype=torch.bool))
    assert_close(out, ref_out.transpose(1, 2), torch.float32)
    assert_close(lse, ref_lse, torch.float32)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad((out * g).sum() + lse.sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out.transpose(1, 2) * g).sum() + ref_lse.sum(), (q, k, v))
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b, torch.float32)


def _args(layout="BNSD", out=(B, N, SQ, D), lse=(B, N, SQ), cur_out=None, cur_lse=None):
    cur_out, cur_lse = cur_out or out, cur_lse or lse
    return torch.randn(out), torch.randn(lse), torch.randn(cur_out), torch.randn(cur_lse), layout


BAD_ARGS = {
    "layout": (lambda: _args(layout="NSD"), ValueError, r"layout='NSD' is not supported"),
    "out-rank": (lambda: _args(out=(B, SQ, N * D), cur_out=(B, SQ, N * D)), ValueError,
                 r"prev_out has shape \(2, 7, 12\) but layout 'BNSD' needs a 4-d"),
    "lse-rank": (lambda: _args(layout="TND", out=(SQ, N, D), lse=(SQ, N, 1)), ValueError,
                 r"prev_lse has shape \(7, 3, 1\) but layout 'TND' needs a 2-d"),
    "cur_out-shape": (lambda: _args(cur_out=(B, N, SQ, D + 1)), ValueError, r"cur_out has shape \(2, 3, 7, 5\) but prev_out"),
    "cur_lse-shape": (lambda: _args(cur_lse=(B, N, SQ + 1)), ValueError, r"cur_lse has shape \(2, 3, 8\) but prev_lse"),
    "lse-fit": (lambda: _args(lse=(B, N, SQ + 1)), ValueError, r"prev_lse has shape \(2, 3, 8\), which does not fit"),
    "lse-heads-sbh": (lambda: _args(layout="SBH", out=(SQ, B, 10), lse=(B, 3, SQ)), ValueError,
                      r"pass lse as \[B, N, S\]"),
    "lse-tnd": (lambda: _args(layout="TND", out=(SQ, N, D), lse=(SQ, N + 1)), ValueError, r"pass lse as \[T, N\]"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments(case):
    build, exc, match = BAD_ARGS[case]
    with pytest.raises(exc, match=match):
        ring_attention_update(*build())


def test_bad_tensor_type_and_device():
    prev_out, prev_lse, cur_out, cur_lse, layout = _args()
    with pytest.raises(TypeError, match=r"cur_lse has type torch.int64; pass a floating tensor"):
        ring_attention_update(prev_out, prev_lse, cur_out, cur_lse.long(), layout)
    with pytest.raises(TypeError, match=r"prev_out has type list"):
        ring_attention_update([0.0], prev_lse, cur_out, cur_lse, layout)
    with pytest.raises(ValueError, match=r"cur_out is on meta but prev_out is on cpu"):
        ring_attention_update(prev_out, prev_lse, cur_out.to("meta"), cur_lse, layout)
