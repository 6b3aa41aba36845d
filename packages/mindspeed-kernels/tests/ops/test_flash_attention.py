"""flash_attention (reference backend) against a naive formula written here: K/V repeated per
query head, the whole score matrix in float64, an explicit boolean mask built from the
docstring's rules, softmax, matmul; torch autograd of that formula for the gradients."""

from __future__ import annotations

import gc
import math

import pytest
import torch
from kernels_naive import from_bnsd, layout_shape, to_bnsd

from mindspeed_kernels import accelerator
from mindspeed_kernels.backends.reference import _flash_blocks
from mindspeed_kernels.ops import flash_attention
from mindspeed_kernels.ops.attention import NO_LIMIT
from mindspeed_kernels.testing import assert_close, assert_error_within

LAYOUTS = ("SBH", "BSH", "BSND", "BNSD")
DEFAULT_BLOCKS = (_flash_blocks.BLOCK_Q, _flash_blocks.BLOCK_KV)

# name -> (sparse_mode, pre_tokens, next_tokens, atten_mask shape kind)
CONFIGS = {
    "full": (0, NO_LIMIT, NO_LIMIT, None),
    "mask+band": (0, 4, 1, "b1"),
    "mask": (1, NO_LIMIT, NO_LIMIT, "bn"),
    "causal-tl": (2, NO_LIMIT, NO_LIMIT, None),
    "causal-br": (3, NO_LIMIT, NO_LIMIT, None),
    "band-br": (4, 3, 1, None),
}


@pytest.fixture(autouse=True)
def tiny_blocks(monkeypatch):
    """Blocks of 3 query rows x 5 keys: every test shape spans several odd, partly masked blocks."""
    monkeypatch.setattr(_flash_blocks, "BLOCK_Q", 3)
    monkeypatch.setattr(_flash_blocks, "BLOCK_KV", 5)


# ----------------------------------------------------------------------------- naive formula





def rule_mask(mode, s_q, s_kv, pre, nxt, atten_mask):
    """True = masked, straight from the docstring (i query, j key, delta = Skv - Sq)."""
    i, j = torch.arange(s_q)[:, None], torch.arange(s_kv)[None, :]
    delta = s_kv - s_q
    if mode == 0:
        band = (j - i < -pre) | (j - i > nxt)
        return band if atten_mask is None else band | atten_mask
    if mode == 1:
        return atten_mask
    if mode == 2:
        return j > i
    if mode == 3:
        return j > i + delta
    return (j - i - delta < -pre) | (j - i - delta > nxt)


def naive_bnsd(q, k, v, masked, scale, slopes=None):
    """out, lse of q [B, Nq, Sq, D], k/v [B, Nkv, Skv, *]; masked broadcastable to [B, Nq, Sq, Skv]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = scale * (q @ k.transpose(-1, -2))
    if slopes is not None:
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
        dist = (i + k.shape[2] - q.shape[2] - j).abs().to(s.dtype)
        s = s - slopes.to(s.dtype).reshape(-1, q.shape[1], 1, 1) * dist
    masked = masked.expand_as(s)
    s = s.masked_fill(masked, torch.finfo(s.dtype).min)  # finite, so dead rows give no NaN gradient
    p = torch.softmax(s, -1) * ~masked
    lse = torch.where(masked.all(-1), -math.inf, torch.logsumexp(s, -1))
    return p @ v, lse


def naive(layout, q, k, v, n_q, n_kv, mode=0, pre=NO_LIMIT, nxt=NO_LIMIT, mask=None, scale=None, slopes=None, ends=None):
    """The op's contract in full-matrix form, for every layout (TND: sequence by sequence)."""
    d = q.shape[-1] // (n_q if layout in ("SBH", "BSH") else 1)
    scale = d**-0.5 if scale is None else scale
    if layout != "TND":
        q4, k4, v4 = to_bnsd(q, layout, n_q), to_bnsd(k, layout, n_kv), to_bnsd(v, layout, n_kv)
        out, lse = naive_bnsd(q4, k4, v4, rule_mask(mode, q4.shape[2], k4.shape[2], pre, nxt, mask), scale, slopes)
        return from_bnsd(out, layout), lse
    outs, lses = [], []
    q_ends, kv_ends = ends
    for idx, (q0, q1, k0, k1) in enumerate(zip((0, *q_ends[:-1]), q_ends, (0, *kv_ends[:-1]), kv_ends, strict=True)):
        seq = lambda x, a, b: x[a:b].permute(1, 0, 2)[None]
        sub_mask = None if mask is None else mask[: q1 - q0, : k1 - k0]
        sl = None if slopes is None or slopes.dim() == 1 else slopes[idx]
        masked = rule_mask(mode, q1 - q0, k1 - k0, pre, nxt, sub_mask)
        out, lse = naive_bnsd(seq(q, q0, q1), seq(k, k0, k1), seq(v, k0, k1), masked, scale, slopes if sl is None else sl)
        outs.append(out[0].permute(1, 0, 2))
        lses.append(lse[0].T)
    return torch.cat(outs), torch.cat(lses)


# ----------------------------------------------------------------------------- helpers


def make_inputs(layout, dtype, n_q=4, n_kv=2, s_q=7, s_kv=11, d=5, d_v=None, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    q = rnd(layout_shape(layout, batch, n_q, s_q, d))
    k = rnd(layout_shape(layout, batch, n_kv, s_kv, d))
    v = rnd(layout_shape(layout, batch, n_kv, s_kv, d if d_v is None else d_v))
    return q, k, v


def random_mask(kind, batch, n_q, s_q, s_kv, seed=1):
    if kind is None:
        return None
    shape = {"b1": (batch, 1, s_q, s_kv), "bn": (batch, n_q, s_q, s_kv), "2d": (s_q, s_kv)}[kind]
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.3


def finite(lse):
    return torch.where(torch.isfinite(lse), lse, 0.0)


def grads(out, lse, inputs, seed=2):
    """Gradients of a random linear function of out and of the finite lse entries."""
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(lse.dtype)
    loss = (out * g_out).sum() + (finite(lse) * g_lse).sum()
    return torch.autograd.grad(loss, inputs)


def compare(layout, q, k, v, n_q, n_kv, op_kwargs, naive_kwargs):
    """fp32: op vs the float64 naive formula within TOLERANCES[float32]; also returns the results."""
    out, lse = flash_attention(q, k, v, layout, **op_kwargs)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = naive(layout, *leaves, n_q, n_kv, **naive_kwargs)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and out.shape == ref_out.shape
    assert lse.shape == ref_lse.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert_close(out, ref_out, torch.float32)
    assert_close(lse, ref_lse, torch.float32)
    for ours, ref in zip(grads(out, lse, (q, k, v)), grads(ref_out, ref_lse, leaves), strict=True):
        assert torch.isfinite(ours).all()
        assert_close(ours, ref, torch.float32)
    return out, lse


def case_kwargs(name, batch, n_q, s_q, s_kv, mask_kind=None, tnd=False):
    mode, pre, nxt, kind = CONFIGS[name]
    kind = "2d" if tnd and kind else (mask_kind or kind)
    mask = random_mask(kind, batch, n_q, s_q, s_kv)
    op = dict(sparse_mode=mode, pre_tokens=pre, next_tokens=nxt, atten_mask=mask)
    return op, dict(mode=mode, pre=pre, nxt=nxt, mask=mask)


# ----------------------------------------------------------------------------- forward + backward matrix


@pytest.mark.parametrize("s_q,s_kv,d", [(7, 11, 5), (11, 7, 8)])
@pytest.mark.parametrize("n_kv", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_naive_fp32(layout, config, n_kv, s_q, s_kv, d):
    q, k, v = make_inputs(layout, torch.float32, n_kv=n_kv, s_q=s_q, s_kv=s_kv, d=d)
    op, ref = case_kwargs(config, 2, 4, s_q, s_kv)
    heads = {"num_heads": 4} if layout in ("SBH", "BSH") else {}
    compare(layout, q, k, v, 4, n_kv, {**op, **heads}, ref)


TND_Q_ENDS, TND_KV_ENDS = (4, 5, 11), (6, 9, 10)  # q lengths 4, 1, 6; kv lengths 6, 3, 1


@pytest.mark.parametrize("n_kv", [2, 1], ids=["gqa2", "mqa"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_tnd_matches_naive(config, n_kv):
    q, k, v = make_inputs("TND", torch.float32, n_kv=n_kv, s_q=11, s_kv=10)
    op, ref = case_kwargs(config, 1, 4, 7, 8, tnd=True)  # a mask larger than every sequence
    ends = dict(actual_seq_qlen=list(TND_Q_ENDS), actual_seq_kvlen=torch.tensor(TND_KV_ENDS))
    compare("TND", q, k, v, 4, n_kv, {**op, **ends}, {**ref, "ends": (TND_Q_ENDS, TND_KV_ENDS)})


@pytest.mark.parametrize("config", ["full", "mask+band", "causal-br", "band-br"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["BSH", "BNSD"])
def test_half_precision_error_within_naive(layout, dtype, config):
    """bf16/fp16 inputs: the op's error against the float64 formula is at most twice the error of
    the same formula evaluated in the low dtype (FlashAttention's own criterion)."""
    q, k, v = make_inputs(layout, dtype, n_kv=2, s_q=11, s_kv=13, d=8)
    op, ref = case_kwargs(config, 2, 4, 11, 13)
    heads = {"num_heads": 4} if layout in ("SBH", "BSH") else {}
    out, lse = flash_attention(q, k, v, layout, **op, **heads)
    assert out.dtype == dtype and lse.dtype == torch.float32
    exact_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    low_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    exact, low = naive(layout, *exact_in, 4, 2, **ref), naive(layout, *low_in, 4, 2, **ref)
    for ours, lo, ex in zip((out, finite(lse)), (low[0], finite(low[1])), (exact[0], finite(exact[1])), strict=True):
        assert_error_within(ours, lo, ex)
    g_ours, g_low, g_exact = grads(out, lse, (q, k, v)), grads(*low, low_in), grads(*exact, exact_in)
    for ours, lo, ex in zip(g_ours, g_low, g_exact, strict=True):
        assert_error_within(ours, lo, ex)


# ----------------------------------------------------------------------------- special cases


@pytest.mark.parametrize(
    "mode,pre,nxt,kind", [(4, 0, 0, None), (3, NO_LIMIT, NO_LIMIT, None), (1, NO_LIMIT, NO_LIMIT, "dead-row")]
)
def test_fully_masked_rows(mode, pre, nxt, kind):
    """Sq=11 > Skv=5: the bottom-right window/causal leaves the first rows without keys; an
    all-True mask row does the same. Those rows: out 0, lse -inf, finite (zero) gradients."""
    q, k, v = make_inputs("BNSD", torch.float32, s_q=11, s_kv=5)
    mask = None
    if kind:
        mask = random_mask("b1", 2, 4, 11, 5)
        mask[:, :, 2] = True
    op = dict(sparse_mode=mode, pre_tokens=pre, next_tokens=nxt, atten_mask=mask)
    compare("BNSD", q, k, v, 4, 2, op, dict(mode=mode, pre=pre, nxt=nxt, mask=mask))
    out, lse = flash_attention(q, k, v, "BNSD", **op)
    dead = torch.isinf(lse)
    assert dead.any() and (lse[dead] < 0).all()
    assert (out.detach()[dead] == 0).all()
    dq = torch.autograd.grad(out.sum() + finite(lse).sum(), q)[0]
    assert torch.isfinite(dq).all() and (dq[dead] == 0).all()


@pytest.mark.parametrize("slopes_shape", [(4,), (2, 4)])
@pytest.mark.parametrize("config", ["full", "causal-br"])
def test_alibi(config, slopes_shape):
    q, k, v = make_inputs("BSND", torch.float32, s_q=7, s_kv=11)
    slopes = torch.rand(slopes_shape, generator=torch.Generator().manual_seed(3))
    op, ref = case_kwargs(config, 2, 4, 7, 11)
    compare("BSND", q, k, v, 4, 2, {**op, "alibi_slopes": slopes}, {**ref, "slopes": slopes})


def test_alibi_tnd_per_sequence_slopes():
    q, k, v = make_inputs("TND", torch.float32, s_q=11, s_kv=10)
    slopes = torch.rand(3, 4, generator=torch.Generator().manual_seed(3))
    ends = dict(actual_seq_qlen=TND_Q_ENDS, actual_seq_kvlen=TND_KV_ENDS)
    compare("TND", q, k, v, 4, 2, {"sparse_mode": 3, "alibi_slopes": slopes, **ends},
            {"mode": 3, "slopes": slopes, "ends": (TND_Q_ENDS, TND_KV_ENDS)})


@pytest.mark.parametrize("layout", ["BSH", "SBH", "BNSD", "TND"])
def test_value_head_dim_differs_and_custom_scale(layout):
    s_q, s_kv = (11, 10) if layout == "TND" else (7, 11)
    q, k, v = make_inputs(layout, torch.float32, s_q=s_q, s_kv=s_kv, d=5, d_v=3)
    extra = {"num_heads": 4} if layout in ("SBH", "BSH") else {}
    ends = {}
    if layout == "TND":
        extra = dict(actual_seq_qlen=TND_Q_ENDS, actual_seq_kvlen=TND_KV_ENDS)
        ends = {"ends": (TND_Q_ENDS, TND_KV_ENDS)}
    out, _ = compare(layout, q, k, v, 4, 2, {"sparse_mode": 2, "scale": 0.3, **extra}, {"mode": 2, "scale": 0.3, **ends})
    assert out.shape[-1] == (4 * 3 if layout in ("SBH", "BSH") else 3)


def test_gradient_through_lse_only():
    """Only softmax_lse feeds the loss (dout is None in backward): dS = P * dlse."""
    q, k, v = make_inputs("BSND", torch.float32, s_q=11, s_kv=7)
    lse = flash_attention(q, k, v, "BSND", 3, num_heads=4)[1]
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_lse = naive("BSND", *leaves, 4, 2, mode=3)[1]
    ours = torch.autograd.grad(finite(lse).sum(), (q, k, v), allow_unused=True)
    ref = torch.autograd.grad(finite(ref_lse).sum(), leaves, allow_unused=True)
    assert_close(ours[0], ref[0], torch.float32)
    assert_close(ours[1], ref[1], torch.float32)
    assert ref[2] is None and (ours[2] == 0).all()


def test_default_blocks_single_block_path(monkeypatch):
    """The production block sizes (one block for these shapes) give the same answer."""
    monkeypatch.setattr(_flash_blocks, "BLOCK_Q", DEFAULT_BLOCKS[0])
    monkeypatch.setattr(_flash_blocks, "BLOCK_KV", DEFAULT_BLOCKS[1])
    q, k, v = make_inputs("BNSD", torch.float32, s_q=11, s_kv=7)
    compare("BNSD", q, k, v, 4, 2, {"sparse_mode": 4, "pre_tokens": 2, "next_tokens": 0}, {"mode": 4, "pre": 2, "nxt": 0})


def test_block_sizes_shrink_to_memory_bound():
    bq, bk = _flash_blocks.block_sizes(64, 8192, 8192, (512, 1024, 1 << 22))
    assert 64 * bq * bk <= 1 << 22 and min(bq, bk) >= _flash_blocks.MIN_BLOCK
    assert _flash_blocks.block_sizes(1, 7, 3, (512, 1024, 1 << 22)) == (7, 3)


# ----------------------------------------------------------------------------- gradcheck (float64)

GRADCHECK_CASES = {
    "bnsd-gqa-mask+band": ("BNSD", 4, 2, dict(sparse_mode=0, pre_tokens=3, next_tokens=1, atten_mask="b1")),
    "bsh-mqa-causal-br": ("BSH", 4, 1, dict(sparse_mode=3, num_heads=4)),
    "sbh-band-br-alibi": ("SBH", 4, 2, dict(sparse_mode=4, pre_tokens=2, next_tokens=1, num_heads=4, alibi_slopes=True)),
    "tnd-gqa-causal-br": ("TND", 2, 1, dict(sparse_mode=3, actual_seq_qlen=TND_Q_ENDS, actual_seq_kvlen=TND_KV_ENDS)),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck_float64(case):
    layout, n_q, n_kv, kwargs = GRADCHECK_CASES[case]
    s_q, s_kv = (11, 10) if layout == "TND" else (5, 7)
    q, k, v = make_inputs(layout, torch.float64, n_q=n_q, n_kv=n_kv, s_q=s_q, s_kv=s_kv, d=3, batch=1)
    if kwargs.get("atten_mask"):
        kwargs = {**kwargs, "atten_mask": random_mask("b1", 1, 4, s_q, s_kv)}
    if kwargs.get("alibi_slopes"):
        kwargs = {**kwargs, "alibi_slopes": torch.rand(4, dtype=torch.float64)}
    fn = lambda q, k, v: tuple(map(finite, flash_attention(q, k, v, layout, **kwargs)))
    assert torch.autograd.gradcheck(fn, (q, k, v))


# ----------------------------------------------------------------------------- dropout


def test_dropout_zero_is_default():
    q, k, v = make_inputs("BSND", torch.float32)
    a = flash_attention(q, k, v, "BSND", 3)
    b = flash_attention(q, k, v, "BSND", 3, dropout_p=0.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_dropout_gradcheck_replays_mask():
    """Reseeding before every call fixes the drawn seed; backward must regenerate the very masks
    forward used, or the analytic and numeric gradients disagree."""
    q, k, v = make_inputs("BNSD", torch.float64, n_kv=1, s_q=5, s_kv=7, d=3, batch=1)

    def fn(q, k, v):
        torch.manual_seed(1234)
        return flash_attention(q, k, v, "BNSD", 2, dropout_p=0.4)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_dropout_reproducible_and_unbiased(monkeypatch):
    monkeypatch.setattr(_flash_blocks, "BLOCK_Q", DEFAULT_BLOCKS[0])  # one block: fast repeated draws
    monkeypatch.setattr(_flash_blocks, "BLOCK_KV", DEFAULT_BLOCKS[1])
    q, k, v = (x.detach() for x in make_inputs("BNSD", torch.float64, n_kv=1, s_q=4, s_kv=6, d=3, batch=1))
    ref, ref_lse = flash_attention(q, k, v, "BNSD")
    torch.manual_seed(7)
    first, lse = flash_attention(q, k, v, "BNSD", dropout_p=0.3)
    torch.manual_seed(7)
    again, _ = flash_attention(q, k, v, "BNSD", dropout_p=0.3)
    assert torch.equal(first, again) and torch.equal(lse, ref_lse)  # lse ignores dropout
    assert not torch.allclose(first, ref)
    draws = torch.stack([flash_attention(q, k, v, "BNSD", dropout_p=0.3)[0] for _ in range(2000)])
    # Inverted dropout is unbiased: E[out] = out without dropout. By the central limit theorem the
    # mean of n draws lies within 6 standard errors of it for all 32 entries except with
    # probability ~1e-7 (and the fixed seed makes the test deterministic anyway).
    stderr = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - ref).abs() <= 6 * stderr + 1e-12).all()


# ----------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_peak_memory_is_linear_in_sequence(monkeypatch):
    """B=1, N=4, S=4096, D=64 fp32 causal forward + backward with the production block sizes.

    One [N, S, S] float32 score matrix is 256 MiB (naive attention holds several). The reference
    holds O(S) tensors (out, dq, dk, dv: 4 MiB each) plus a few block temporaries of
    N * 512 * 1024 floats (8 MiB each), about 50 MiB in all. On CPU the statistic is the process's
    peak RSS, which also counts what the allocator keeps after frees, so the bound is half of one
    score matrix: loose enough for allocator noise, yet a single materialised [N, S, S] score
    matrix alone would exceed it."""
    monkeypatch.setattr(_flash_blocks, "BLOCK_Q", DEFAULT_BLOCKS[0])
    monkeypatch.setattr(_flash_blocks, "BLOCK_KV", DEFAULT_BLOCKS[1])
    n, s, d = 4, 4096, 64
    q, k, v = (torch.randn(1, n, s, d, requires_grad=True) for _ in range(3))
    g = torch.randn(1, n, s, d)
    # one unmeasured call first: it pages in kernels and grows the allocator's arenas
    flash_attention(q, k, v, "BNSD", 3)[0].backward(g)
    q.grad = k.grad = v.grad = None
    gc.collect()
    if not accelerator.reset_peak_memory():
        pytest.skip("peak memory cannot be reset on this platform")
    before = accelerator.memory_stats().current_bytes
    out, _ = flash_attention(q, k, v, "BNSD", 3)
    out.backward(g)
    used = accelerator.memory_stats().peak_bytes - before
    score_matrix = n * s * s * 4
    assert used < score_matrix / 2, f"peak {used / 2**20:.0f} MiB vs one score matrix {score_matrix / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- validation


def _bnsd(n_q=4, n_kv=2, s_q=7, s_kv=11, d=5, dtype=torch.float32):
    return torch.randn(2, n_q, s_q, d, dtype=dtype), torch.randn(2, n_kv, s_kv, d), torch.randn(2, n_kv, s_kv, d)


def _bsh(h_q=20, h_k=10, h_v=10):
    return torch.randn(2, 7, h_q), torch.randn(2, 11, h_k), torch.randn(2, 11, h_v)


def _tnd():
    return torch.randn(11, 4, 5), torch.randn(10, 2, 5), torch.randn(10, 2, 5)


_TND = dict(actual_seq_qlen=[4, 5, 11], actual_seq_kvlen=[6, 9, 10])
_MASK = torch.zeros(7, 11, dtype=torch.bool)

BAD_ARGS = {
    "layout": (lambda: (_bnsd(), dict(layout="BHSD")), ValueError, r"layout='BHSD' is not supported"),
    "q-rank": (lambda: (_tnd(), dict(layout="BNSD")), ValueError, r"q has shape \(11, 4, 5\) but layout 'BNSD' needs a 4-d"),
    "k-rank": (lambda: ((_bnsd()[0], torch.randn(2, 2, 11), _bnsd()[2]), {}), ValueError, r"k has shape"),
    "q-type": (lambda: (([1.0], *_bnsd()[1:]), {}), TypeError, r"q must be a torch.Tensor"),
    "q-dtype": (lambda: ((_bnsd()[0].long(), *_bnsd()[1:]), {}), TypeError, r"q has dtype torch.int64"),
    "k-dtype": (lambda: (_bnsd(dtype=torch.float64), {}), TypeError, r"k has dtype torch.float32 but q has torch.float64"),
    "k-device": (lambda: ((_bnsd()[0], _bnsd()[1].to("meta"), _bnsd()[2]), {}), ValueError, r"k is on meta but q is on cpu"),
    "num_heads-missing": (lambda: (_bsh(), dict(layout="BSH")), ValueError, r"num_heads is required for layout 'BSH'"),
    "num_heads-divide": (lambda: (_bsh(), dict(layout="SBH", num_heads=3)), ValueError, r"num_heads=3 does not divide"),
    "num_heads-zero": (lambda: (_bsh(), dict(layout="BSH", num_heads=0)), ValueError, r"num_heads=0 must be a positive int"),
    "num_heads-mismatch": (lambda: (_bnsd(), dict(num_heads=2)), ValueError, r"num_heads=2 does not match q's 4 heads"),
    "k-hidden": (lambda: (_bsh(h_k=7), dict(layout="BSH", num_heads=4)), ValueError, r"k's hidden size 7"),
    "v-hidden": (lambda: (_bsh(h_v=9), dict(layout="BSH", num_heads=4)), ValueError, r"v's hidden size 9"),
    "gqa-divide": (lambda: (_bnsd(n_kv=3), {}), ValueError, r"k/v have 3 heads, which does not divide q's 4"),
    "gqa-divide-bsh": (lambda: (_bsh(h_k=15, h_v=15), dict(layout="BSH", num_heads=4)), ValueError, r"k/v have 3 heads"),
    "v-heads": (lambda: ((*_bnsd()[:2], torch.randn(2, 1, 11, 5)), {}), ValueError, r"v has 1 heads but k has 2"),
    "head-dim": (lambda: ((_bnsd()[0], torch.randn(2, 2, 11, 4), _bnsd()[2]), {}), ValueError, r"q's head dim 5 differs"),
    "batch": (lambda: ((_bnsd()[0], torch.randn(3, 2, 11, 5), torch.randn(3, 2, 11, 5)), {}), ValueError,
              r"k has batch size 3 but q has 2"),
    "kv-length": (lambda: ((*_bnsd()[:2], torch.randn(2, 2, 10, 5)), {}), ValueError, r"v has sequence length 10 but k has 11"),
    "sparse_mode": (lambda: (_bnsd(), dict(sparse_mode=5)), ValueError, r"sparse_mode=5 is not supported"),
    "sparse_mode-bool": (lambda: (_bnsd(), dict(sparse_mode=True)), ValueError, r"sparse_mode=True"),
    "mode1-no-mask": (lambda: (_bnsd(), dict(sparse_mode=1)), ValueError, r"sparse_mode=1 needs atten_mask"),
    "mode3-mask": (lambda: (_bnsd(), dict(sparse_mode=3, atten_mask=_MASK)), ValueError,
                   r"atten_mask must be None with sparse_mode=3"),
    "mode0-band-no-mask": (lambda: (_bnsd(), dict(pre_tokens=3)), ValueError, r"pre_tokens=3/next_tokens=.* need atten_mask"),
    "pre_tokens-type": (lambda: (_bnsd(), dict(sparse_mode=4, pre_tokens=1.5)), TypeError, r"pre_tokens=1.5 must be an int"),
    "next_tokens-type": (lambda: (_bnsd(), dict(sparse_mode=4, next_tokens="0")), TypeError, r"next_tokens='0' must be an int"),
    "mask-dtype": (lambda: (_bnsd(), dict(atten_mask=_MASK.float())), TypeError, r"atten_mask has type torch.float32"),
    "mask-shape": (lambda: (_bnsd(), dict(atten_mask=torch.zeros(3, 7, 11, dtype=torch.bool))), ValueError,
                   r"atten_mask has shape \(3, 7, 11\), not broadcastable"),
    "mask-device": (lambda: (_bnsd(), dict(atten_mask=_MASK.to("meta"))), ValueError, r"atten_mask is on meta"),
    "mask-tnd": (lambda: (_tnd(), dict(layout="TND", atten_mask=torch.zeros(1, 6, 6, dtype=torch.bool), **_TND)),
                 ValueError, r"atten_mask has shape \(1, 6, 6\); for TND pass a 2-d mask of at least \[6, 6\]"),
    "mask-tnd-small": (lambda: (_tnd(), dict(layout="TND", atten_mask=torch.zeros(6, 5, dtype=torch.bool), **_TND)),
                       ValueError, r"for TND pass a 2-d mask of at least"),
    "seqlen-missing": (lambda: (_tnd(), dict(layout="TND", actual_seq_kvlen=[10])), ValueError,
                       r"actual_seq_qlen is required for layout 'TND'"),
    "seqlen-increasing": (lambda: (_tnd(), dict(layout="TND", actual_seq_qlen=[4, 4, 11], actual_seq_kvlen=[6, 9, 10])),
                          ValueError, r"actual_seq_qlen=\[4, 4, 11\] must be strictly increasing"),
    "seqlen-end": (lambda: (_tnd(), dict(layout="TND", actual_seq_qlen=[4, 5, 11], actual_seq_kvlen=[6, 9])), ValueError,
                   r"actual_seq_kvlen=\[6, 9\] ends at 9 but the tensor has T=10"),
    "seqlen-count": (lambda: (_tnd(), dict(layout="TND", actual_seq_qlen=[4, 11], actual_seq_kvlen=[6, 9, 10])), ValueError,
                     r"actual_seq_qlen has 2 sequences but actual_seq_kvlen has 3"),
    "seqlen-type": (lambda: (_tnd(), dict(layout="TND", actual_seq_qlen=torch.tensor([4.0, 11.0]), actual_seq_kvlen=[10])),
                    TypeError, r"actual_seq_qlen must be a 1-d integer tensor"),
    "seqlen-items": (lambda: (_tnd(), dict(layout="TND", actual_seq_qlen=[4, 11.0], actual_seq_kvlen=[10])), TypeError,
                     r"actual_seq_qlen=\[4, 11.0\] must be a sequence of ints"),
    "seqlen-not-tnd": (lambda: (_bnsd(), dict(actual_seq_kvlen=[11])), ValueError,
                       r"actual_seq_kvlen is only for layout 'TND', not 'BNSD'"),
    "dropout": (lambda: (_bnsd(), dict(dropout_p=1.0)), ValueError, r"dropout_p=1.0 must be a float in \[0, 1\)"),
    "scale": (lambda: (_bnsd(), dict(scale=float("nan"))), ValueError, r"scale=nan must be a finite float or None"),
    "alibi-shape": (lambda: (_bnsd(), dict(alibi_slopes=torch.rand(2))), ValueError,
                    r"alibi_slopes has shape \(2,\); pass \[Nq\]"),
    "alibi-tnd-batch": (lambda: (_tnd(), dict(layout="TND", alibi_slopes=torch.rand(2, 4), **_TND)), ValueError,
                        r"alibi_slopes has shape \(2, 4\); pass \[Nq\] = \[4\] or \[B, Nq\] = \[3, 4\]"),
    "alibi-dtype": (lambda: (_bnsd(), dict(alibi_slopes=torch.ones(4, dtype=torch.int32))), TypeError,
                    r"alibi_slopes must be a floating tensor"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments(case):
    build, exc, match = BAD_ARGS[case]
    (q, k, v), kwargs = build()
    with pytest.raises(exc, match=match):
        flash_attention(q, k, v, **kwargs)
