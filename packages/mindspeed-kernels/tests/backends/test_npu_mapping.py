"""The npu backend's mapping onto torch_npu, checked on CPU against ``fake_torch_npu.py`` (the
documented signatures, constraints and formulas): every op is called through the public API
with ``backend="npu"`` and compared with a naive formula of the op's contract written here,
forward and backward."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernels_naive import from_bnsd, to_bnsd

from mindspeed_kernels import ops, registry
from mindspeed_kernels.backends.npu import rotary as npu_rotary
from mindspeed_kernels.ops.attention import NO_LIMIT
from mindspeed_kernels.testing import TOLERANCES, assert_close

_SPEC = importlib.util.spec_from_file_location("fake_torch_npu", Path(__file__).with_name("fake_torch_npu.py"))
FAKE = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(FAKE)
HALF = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture
def npu(monkeypatch):
    """A fresh fake torch_npu in sys.modules; availability is re-probed around the test."""
    fake = FAKE.make_module()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    registry.reset()
    yield fake
    registry.reset()


def called(fake, name):
    return [args for fn, args in fake.calls if fn == name]


def rand(*shape, dtype=torch.float32, seed=0, grad=True):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return x.requires_grad_(grad)


def check_grads(ours_out, ref_out, ours_in, ref_in, dtype):
    """Gradients of one random linear functional of both outputs, compared input by input."""
    g = rand(*ref_out.shape, dtype=torch.float64, seed=99, grad=False)
    got = torch.autograd.grad((ours_out.double() * g).sum(), ours_in)
    want = torch.autograd.grad((ref_out.double() * g).sum(), ref_in)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, dtype)


def leaves(*xs):
    return [x.detach().double().requires_grad_() for x in xs]


# ----------------------------------------------------------------------------- availability


def test_without_torch_npu_npu_requests_raise_naming_the_env_var(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # "import torch_npu" now raises ImportError
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    registry.reset()
    try:
        assert registry.availability()["npu"].startswith("torch_npu is not importable")
        x = torch.randn(2, 4)
        with pytest.raises(registry.BackendUnavailable, match=r"'npu' was requested .*MINDSPEED_KERNEL_BACKEND.*torch_npu"):
            ops.rms_norm(x, backend="npu")
        monkeypatch.setenv(registry.ENV_VAR, "npu")
        with pytest.raises(registry.BackendUnavailable, match="MINDSPEED_KERNEL_BACKEND"):
            ops.swiglu(x)
    finally:
        registry.reset()


def test_env_var_selects_npu_for_cpu_tensors(npu, monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "npu")
    assert registry.availability()["npu"] is None
    ops.swiglu(torch.randn(3, 4))
    assert len(called(npu, "npu_swiglu")) == 1


def test_fused_linear_cross_entropy_is_the_reference():
    from mindspeed_kernels.backends import npu, reference

    assert npu.OPS["fused_linear_cross_entropy"] is reference.OPS["fused_linear_cross_entropy"]


# ----------------------------------------------------------------------------- rms_norm


def naive_rms(x, w, eps, offset):
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * (1 + w if offset else w)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("weight,offset", [("same", False), ("fp32", False), ("same", True), (None, False)])
@pytest.mark.parametrize("compute_in_fp32", [True, False])
def test_rms_norm(npu, dtype, weight, offset, compute_in_fp32):
    x = rand(2, 3, 16, dtype=dtype)
    w = None if weight is None else rand(16, dtype=dtype if weight == "same" else torch.float32, seed=1)
    y = ops.rms_norm(x, w, 1e-5, add_rmsnorm_offset=offset, compute_in_fp32=compute_in_fp32, backend="npu")
    xr, *wr = leaves(x, *([] if w is None else [w]))
    ref = naive_rms(xr, wr[0] if wr else None, 1e-5, offset)
    assert y.dtype == dtype and y.shape == x.shape
    # the kernel computes in float32 whatever compute_in_fp32 says (documented deviation)
    assert_close(y, ref, dtype)
    check_grads(y, ref, [x] + ([w] if w is not None else []), [xr, *wr], dtype)
    (args,) = called(npu, "npu_rms_norm")
    assert args["self"].dim() == 2 and args["epsilon"] == 1e-5
    want_gamma = torch.float32 if offset or weight == "fp32" else dtype
    assert args["gamma"].dtype == want_gamma


def test_rms_norm_1d_and_float64(npu):
    x = torch.randn(8)
    assert_close(ops.rms_norm(x, backend="npu"), naive_rms(x.double(), None, 1e-6, False), torch.float32)
    x64 = torch.randn(3, 8, dtype=torch.float64)
    assert_close(ops.rms_norm(x64, backend="npu"), naive_rms(x64, None, 1e-6, False), torch.float64)
    assert len(called(npu, "npu_rms_norm")) == 1  # float64 ran the reference implementation


# ----------------------------------------------------------------------------- swiglu / geglu


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("dim", [-1, 0])
@pytest.mark.parametrize("kind", ["swiglu", "geglu-none", "geglu-tanh"])
def test_gated_activations(npu, dtype, dim, kind):
    x = rand(6, 8, dtype=dtype).transpose(0, 1)  # non-contiguous input
    xr = leaves(x)[0]
    gate, up = xr.chunk(2, dim)
    if kind == "swiglu":
        y, ref = ops.swiglu(x, dim, backend="npu"), gate * torch.sigmoid(gate) * up
    else:
        approx = kind.split("-")[1]
        y, ref = ops.geglu(x, dim, approx, backend="npu"), F.gelu(gate, approximate=approx) * up
    assert y.dtype == dtype
    assert_close(y, ref, dtype)
    check_grads(y, ref, [x], [xr], dtype)
    if kind != "swiglu":
        (args,) = called(npu, "npu_geglu")
        assert args["activate_left"] is True and args["approximate"] == (1 if kind.endswith("tanh") else 0)


# ----------------------------------------------------------------------------- rotary


def naive_rotary(x, cos, sin, interleaved):
    r = cos.shape[-1]
    xr = x[..., :r]
    if interleaved:
        turned = torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2)
    else:
        turned = torch.cat((-xr[..., r // 2:], xr[..., : r // 2]), -1)
    return torch.cat((xr * cos + turned * sin, x[..., r:]), -1)


ROTARY_CASES = {  # name: (x shape, cos shape)
    "sbnd": ((5, 2, 3, 8), (5, 1, 1, 8)),
    "bsnd": ((2, 5, 3, 8), (1, 5, 1, 8)),
    "bnsd": ((2, 3, 5, 8), (5, 8)),
    "bnsd-per-batch": ((2, 3, 5, 8), (2, 1, 5, 8)),
    "tnd-partial": ((7, 3, 8), (7, 1, 4)),
    "td": ((7, 8), (7, 8)),
    "full-cos": ((2, 3, 5, 8), (2, 3, 5, 8)),
}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("case", list(ROTARY_CASES))
def test_rotary(npu, dtype, interleaved, case):
    x_shape, c_shape = ROTARY_CASES[case]
    x = rand(*x_shape, dtype=dtype)
    angle = rand(*c_shape, seed=3, grad=False)
    cos, sin = angle.cos().requires_grad_(), angle.sin().requires_grad_()
    y = ops.rotary_pos_emb(x, cos, sin, interleaved, backend="npu")
    xr, cr, sr = leaves(x, cos, sin)
    ref = naive_rotary(xr, cr, sr, interleaved)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref, dtype)
    check_grads(y, ref, [x, cos, sin], [xr, cr, sr], dtype)
    (args,) = called(npu, "npu_rotary_mul")
    assert args["rotary_mode"] == ("interleave" if interleaved else "half")


def test_rotary_plans():
    plan = npu_rotary.plan_4d
    assert plan((5, 2, 3), (5, 1, 1), False) == ((5, 6, 1), (5, 1, 1))  # SBND -> S11D
    assert plan((2, 5, 3), (1, 5, 1), True) == ((2, 5, 3), (1, 5, 1))  # BSND -> 1S1D
    assert plan((2, 3, 5), (5,), True) == ((1, 6, 5), (1, 1, 5))  # BNSD -> 11SD
    assert plan((2, 3, 5), (2, 1, 5), False) == ((2, 3, 5), (2, 1, 5))  # B1SD, half only
    assert plan((2, 3, 5), (2, 1, 5), True) is None  # interleave: expand cos
    assert plan((2, 1, 3), (1, 1, 1), False) == ((6, 1, 1), (1, 1, 1))


# ----------------------------------------------------------------------------- flash attention




def contract_mask(mode, s_q, s_kv, pre, nxt, user):
    """True = masked, from the docstring's rules."""
    i, j = torch.arange(s_q)[:, None], torch.arange(s_kv)[None, :]
    delta = s_kv - s_q
    rules = {0: (j - i < -pre) | (j - i > nxt), 1: torch.zeros(s_q, s_kv, dtype=torch.bool), 2: j > i,
             3: j > i + delta, 4: (j - i - delta < -pre) | (j - i - delta > nxt)}
    return rules[mode] if user is None else rules[mode] | user


def naive_problem(q, k, v, masked, scale, slopes):
    """q [B, Nq, Sq, D], k/v [B, Nkv, Skv, *] in float64 -> out, lse."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = scale * q @ k.transpose(-1, -2)
    if slopes is not None:
        i, j = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
        s = s - slopes.double().reshape(-1, q.shape[1], 1, 1) * (i + k.shape[2] - q.shape[2] - j).abs()
    s = s.masked_fill(masked.expand_as(s), -math.inf)
    lse = torch.logsumexp(s, -1)
    p = (s - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1)).exp()
    return p @ v, lse


def naive_attention(q, k, v, layout, n_q, n_kv, mode=0, pre=NO_LIMIT, nxt=NO_LIMIT, mask=None, scale=None,
                    slopes=None, ends=None):
    d = q.shape[-1] // n_q if layout in ("SBH", "BSH") else q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    if layout != "TND":
        q4, k4, v4 = to_bnsd(q, layout, n_q), to_bnsd(k, layout, n_kv), to_bnsd(v, layout, n_kv)
        masked = contract_mask(mode, q4.shape[2], k4.shape[2], pre, nxt, mask)
        out, lse = naive_problem(q4, k4, v4, masked, scale, slopes)
        return from_bnsd(out, layout), lse
    outs, lses = [], []
    for qs, qe, ks, ke in zip((0, *ends[0][:-1]), ends[0], (0, *ends[1][:-1]), ends[1], strict=True):
        one = lambda t, a, b: t[a:b].transpose(0, 1)[None]
        user = None if mask is None else mask[: qe - qs, : ke - ks]
        masked = contract_mask(mode, qe - qs, ke - ks, pre, nxt, user)
        out, lse = naive_problem(one(q, qs, qe), one(k, ks, ke), one(v, ks, ke), masked, scale, None)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].t())
    return torch.cat(outs), torch.cat(lses)


def shape_of(layout, b, n, s, d):
    return {"BNSD": (b, n, s, d), "BSND": (b, s, n, d), "BSH": (b, s, n * d), "SBH": (s, b, n * d), "TND": (s, n, d)}[layout]


def qkv(layout, dtype, n_q=4, n_kv=2, s_q=5, s_kv=7, d=8, d_v=8, b=2):
    return (rand(*shape_of(layout, b, n_q, s_q, d), dtype=dtype, seed=1),
            rand(*shape_of(layout, b, n_kv, s_kv, d), dtype=dtype, seed=2),
            rand(*shape_of(layout, b, n_kv, s_kv, d_v), dtype=dtype, seed=3))


def run_attention(layout, q, k, v, n_q, n_kv, dtype=torch.float32, **kw):
    """The op vs the naive formula: out, lse, and the gradients of a loss using both."""
    heads = {"num_heads": n_q} if layout in ("SBH", "BSH") else {}
    out, lse = ops.flash_attention(q, k, v, layout, backend="npu", **heads, **kw)
    ref_kw = {key: kw[key] for key in ("scale", "alibi_slopes") if key in kw}
    rq, rk, rv = leaves(q, k, v)
    ends = (tuple(kw["actual_seq_qlen"]), tuple(kw["actual_seq_kvlen"])) if layout == "TND" else None
    ref_out, ref_lse = naive_attention(rq, rk, rv, layout, n_q, n_kv, kw.get("sparse_mode", 0),
                                       kw.get("pre_tokens", NO_LIMIT), kw.get("next_tokens", NO_LIMIT),
                                       kw.get("atten_mask"), ref_kw.get("scale"), ref_kw.get("alibi_slopes"), ends)
    assert out.dtype == dtype and out.shape == ref_out.shape and lse.dtype == torch.float32
    assert lse.shape == ref_lse.shape and torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype if dtype == torch.float32 else torch.float16)
    g_out = rand(*out.shape, dtype=torch.float64, seed=7, grad=False)
    g_lse = rand(*lse.shape, dtype=torch.float64, seed=8, grad=False).masked_fill(torch.isinf(ref_lse), 0.0)
    loss = lambda o, s: (o.double() * g_out).sum() + (s.double().masked_fill(torch.isinf(s), 0.0) * g_lse).sum()
    for a, b in zip(torch.autograd.grad(loss(out, lse), (q, k, v)), torch.autograd.grad(loss(ref_out, ref_lse), (rq, rk, rv)),
                    strict=True):
        assert torch.isfinite(a).all()
        assert_close(a, b, dtype)
    return out, lse


MODES = {  # name: (sparse_mode, pre_tokens, next_tokens, user-mask shape or None)
    "full": (0, NO_LIMIT, NO_LIMIT, None),
    "mask+band": (0, 3, 1, "b1ss"),
    "mask": (1, NO_LIMIT, NO_LIMIT, "bnss"),
    "causal-tl": (2, NO_LIMIT, NO_LIMIT, None),
    "causal-br": (3, NO_LIMIT, NO_LIMIT, None),
    "band-br": (4, 2, 1, None),
}


def user_mask(kind, b=2, n=4, s_q=5, s_kv=7):
    if kind is None:
        return None
    shape = {"b1ss": (b, 1, s_q, s_kv), "bnss": (b, n, s_q, s_kv), "ss": (s_q, s_kv), "b11s": (b, 1, 1, s_kv),
             "1nss": (1, n, s_q, s_kv)}[kind]
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(5)) < 0.3
    return mask & ~torch.eye(*mask.shape[-2:], dtype=torch.bool) if mask.shape[-2] > 1 else mask


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", ["SBH", "BSH", "BSND", "BNSD"])
def test_flash_attention_layouts_and_modes(npu, layout, mode):
    sparse_mode, pre, nxt, kind = MODES[mode]
    q, k, v = qkv(layout, torch.float32)
    run_attention(layout, q, k, v, 4, 2, sparse_mode=sparse_mode, pre_tokens=pre, next_tokens=nxt,
                  atten_mask=user_mask(kind))
    args = called(npu, "npu_fusion_attention")[0]
    assert args["input_layout"] == layout and args["head_num"] == 4 and args["scale"] == pytest.approx(8**-0.5)
    if sparse_mode >= 2:
        assert tuple(args["atten_mask"].shape) == (2048, 2048)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["causal-br", "mask+band"])
def test_flash_attention_half_precision(npu, dtype, mode):
    sparse_mode, pre, nxt, kind = MODES[mode]
    q, k, v = qkv("BSND", dtype, n_kv=1, d_v=4)  # MQA, MLA-style smaller value head dim
    run_attention("BSND", q, k, v, 4, 1, dtype=dtype, sparse_mode=sparse_mode, pre_tokens=pre,
                  next_tokens=nxt, atten_mask=user_mask(kind), scale=0.3)


@pytest.mark.parametrize("kind", ["ss", "b11s", "1nss"])
def test_flash_attention_mask_shapes_are_made_documented(npu, kind):
    q, k, v = qkv("BNSD", torch.float32)
    mask = user_mask(kind)
    if kind != "b11s":
        mask[..., 0, :] = True  # a row with no visible key: out 0, lse -inf
    run_attention("BNSD", q, k, v, 4, 2, sparse_mode=1, atten_mask=mask)
    args = called(npu, "npu_fusion_attention")[0]
    assert args["atten_mask"].dim() in (2, 4) and args["inner_precise"] == 2


@pytest.mark.parametrize("slopes_shape", ["n", "bn"])
@pytest.mark.parametrize("mode", ["full", "causal-br", "band-br"])
def test_flash_attention_alibi(npu, mode, slopes_shape):
    sparse_mode, pre, nxt, _ = MODES[mode]
    q, k, v = qkv("BSH", torch.float32)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]) * (torch.tensor([[1.0], [2.0]]) if slopes_shape == "bn" else 1.0)
    run_attention("BSH", q, k, v, 4, 2, sparse_mode=sparse_mode, pre_tokens=pre, next_tokens=nxt, alibi_slopes=slopes,
                  scale=0.5)
    args = called(npu, "npu_fusion_attention")[0]
    assert tuple(args["pse"].shape) == ((2 if slopes_shape == "bn" else 1), 4, 5, 7)


def test_flash_attention_alibi_compressed_pse(npu):
    q, k, v = qkv("BNSD", torch.float32, n_q=1, n_kv=1, s_q=1040, s_kv=1040, d=4, d_v=4, b=1)
    run_attention("BNSD", q, k, v, 1, 1, sparse_mode=2, alibi_slopes=torch.tensor([0.05]))
    args = called(npu, "npu_fusion_attention")[0]
    assert tuple(args["pse"].shape) == (1, 1, 1024, 1040)


TND_ENDS = ([3, 4, 9], [4, 7, 12])  # q lengths 3, 1, 5; kv lengths 4, 3, 5


@pytest.mark.parametrize("mode", list(MODES))
def test_flash_attention_tnd(npu, mode):
    sparse_mode, pre, nxt, kind = MODES[mode]
    q, k, v = qkv("TND", torch.float32, s_q=9, s_kv=12)
    mask = None if kind is None else user_mask("ss", s_q=6, s_kv=6)  # larger than every sequence
    run_attention("TND", q, k, v, 4, 2, sparse_mode=sparse_mode, pre_tokens=pre, next_tokens=nxt, atten_mask=mask,
                  actual_seq_qlen=TND_ENDS[0], actual_seq_kvlen=torch.tensor(TND_ENDS[1]))
    args = called(npu, "npu_fusion_attention")[0]
    assert args["actual_seq_qlen"] == TND_ENDS[0] and args["actual_seq_kvlen"] == TND_ENDS[1]
    if mask is not None:
        assert tuple(args["atten_mask"].shape) == (5, 5)


@pytest.mark.parametrize("case", ["tnd-alibi", "tnd-causal-br-longer-q", "float64"])
def test_flash_attention_falls_back_to_reference(npu, case):
    dtype = torch.float64 if case == "float64" else torch.float32
    layout = "BNSD" if case == "float64" else "TND"
    q, k, v = qkv(layout, dtype, s_q=9, s_kv=12)
    kw = {} if layout == "BNSD" else dict(actual_seq_qlen=[5, 9], actual_seq_kvlen=[3, 12])
    if case == "tnd-alibi":
        kw["alibi_slopes"] = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    if case == "tnd-causal-br-longer-q":
        kw["sparse_mode"] = 3
    heads = {"num_heads": 4} if layout in ("SBH", "BSH") else {}
    out, lse = ops.flash_attention(q, k, v, layout, backend="npu", **heads, **kw)
    ref_out, ref_lse = ops.flash_attention(q, k, v, layout, backend="reference", **heads, **kw)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert not called(npu, "npu_fusion_attention")


@pytest.mark.parametrize("layout", ["BSH", "TND"])
def test_flash_attention_empty_rows(npu, layout):
    if layout == "BSH":  # causal aligned bottom-right with Sq > Skv: the first two rows see nothing
        q, k, v = qkv("BSH", torch.float32, s_q=7, s_kv=5)
        kw = dict(sparse_mode=3)
    else:  # a band that misses the first row of every sequence
        q, k, v = qkv("TND", torch.float32, s_q=9, s_kv=12)
        kw = dict(sparse_mode=4, pre_tokens=2, next_tokens=-1, actual_seq_qlen=TND_ENDS[0],
                  actual_seq_kvlen=TND_ENDS[1])
    out, lse = run_attention(layout, q, k, v, 4, 2, **kw)
    assert torch.isinf(lse).any()
    assert called(npu, "npu_fusion_attention")[0]["inner_precise"] == 2


def test_flash_attention_empty_rows_are_zeroed_whatever_the_kernel_leaves(npu, monkeypatch):
    # model a kernel that ignores inner_precise=2: empty rows then hold the uniform average of v
    attend = FAKE._attend
    monkeypatch.setattr(FAKE, "_attend", lambda *a: attend(*a[:-1], 0))
    q, k, v = qkv("BNSD", torch.float32, s_q=7, s_kv=5)
    run_attention("BNSD", q, k, v, 4, 2, sparse_mode=3)


def test_flash_attention_dropout_keeps_pre_dropout_lse(npu):
    q, k, v = qkv("BNSD", torch.float32)
    torch.manual_seed(0)
    out, lse = ops.flash_attention(q, k, v, "BNSD", 2, dropout_p=0.25, backend="npu")
    ref_out, ref_lse = naive_attention(*leaves(q, k, v), "BNSD", 4, 2, mode=2)
    assert called(npu, "npu_fusion_attention")[0]["keep_prob"] == 0.75
    assert not torch.allclose(out.double(), ref_out)
    assert_close(lse, ref_lse, torch.float32)
    # the lse gradient recomputes the probabilities without dropout
    got = torch.autograd.grad(lse.sum(), (q, k))
    rq, rk, rv = leaves(q, k, v)
    want = torch.autograd.grad(naive_attention(rq, rk, rv, "BNSD", 4, 2, mode=2)[1].sum(), (rq, rk))
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, torch.float32)


def test_flash_attention_without_grad_makes_one_kernel_call(npu):
    q, k, v = (t.detach() for t in qkv("BNSD", torch.float32))
    ops.flash_attention(q, k, v, backend="npu")
    assert len(called(npu, "npu_fusion_attention")) == 1


# ----------------------------------------------------------------------------- ring attention update


def naive_ring(prev_out, prev_lse, cur_out, cur_lse, layout):
    """float64; lse rows that are -inf on both sides give out 0, lse -inf."""
    lse = torch.logaddexp(prev_lse, cur_lse)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    arrange = {"TND": lambda x: x[..., None], "BNSD": lambda x: x[..., None],
               "SBH": lambda x: x.permute(2, 0, 1)[..., None]}.get(layout, lambda x: x.transpose(1, 2)[..., None])
    n = prev_lse.shape[1]
    heads = lambda x: x.unflatten(-1, (n, -1)) if layout in ("SBH", "BSH") else x
    out = heads(prev_out) * arrange((prev_lse - safe).exp()) + heads(cur_out) * arrange((cur_lse - safe).exp())
    return (out.flatten(-2) if layout in ("SBH", "BSH") else out), lse


RING_SHAPES = {"SBH": ((5, 2, 12), (2, 3, 5)), "BSH": ((2, 5, 12), (2, 3, 5)), "BSND": ((2, 5, 3, 4), (2, 3, 5)),
               "BNSD": ((2, 3, 5, 4), (2, 3, 5)), "TND": ((7, 3, 4), (7, 3))}


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)],
                         ids=["fp32", "fp32+bf16", "bf16", "fp16"])
@pytest.mark.parametrize("layout", list(RING_SHAPES))
def test_ring_attention_update(npu, layout, dtypes):
    out_shape, lse_shape = RING_SHAPES[layout]
    prev, cur = rand(*out_shape, dtype=dtypes[0], seed=1), rand(*out_shape, dtype=dtypes[1], seed=2)
    prev_lse, cur_lse = rand(*lse_shape, seed=3), rand(*lse_shape, seed=4)
    with torch.no_grad():
        prev_lse.view(-1)[0] = -math.inf  # one row sees keys on the cur side only
    out, lse = ops.ring_attention_update(prev, prev_lse, cur, cur_lse, layout, backend="npu")
    refs = leaves(prev, prev_lse, cur, cur_lse)
    ref_out, ref_lse = naive_ring(*refs, layout)
    assert out.dtype == dtypes[0] and lse.dtype == torch.float32
    assert_close(out, ref_out, dtypes[1])
    assert_close(lse, ref_lse, torch.float32)
    g_out, g_lse = rand(*out.shape, dtype=torch.float64, seed=5, grad=False), rand(*lse_shape, dtype=torch.float64, seed=6,
                                                                                     grad=False)
    loss = lambda o, s: (o.double() * g_out).sum() + (s.double().masked_fill(torch.isinf(s), 0) * g_lse).sum()
    got = torch.autograd.grad(loss(out, lse), (prev, prev_lse, cur, cur_lse))
    want = torch.autograd.grad(loss(ref_out, ref_lse), refs)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, dtypes[1])
    assert len(called(npu, "npu_ring_attention_update")) == 1


def test_ring_attention_update_rows_dead_on_both_sides(npu):
    prev, cur = rand(2, 3, 5, 4, seed=1), rand(2, 3, 5, 4, seed=2)
    lse = torch.full((2, 3, 5), -math.inf)
    out, merged = ops.ring_attention_update(prev, lse, cur, lse.clone().requires_grad_(), "BNSD", backend="npu")
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(merged).all()
    (g,) = torch.autograd.grad(out.sum(), (prev,))
    assert torch.equal(g, torch.zeros_like(g))


def test_ring_attention_update_without_the_kernel_uses_reference(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", FAKE.make_module(without=("npu_ring_attention_update",)))
    registry.reset()
    try:
        args = (rand(7, 3, 4, seed=1), rand(7, 3, seed=2), rand(7, 3, 4, seed=3), rand(7, 3, seed=4), "TND")
        ours, ref = ops.ring_attention_update(*args, backend="npu"), ops.ring_attention_update(*args, backend="reference")
        assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    finally:
        registry.reset()


# ----------------------------------------------------------------------------- MoE permute / unpermute


def naive_order(indices):
    """Stable sort of the flat (token, slot) pairs by expert id: the source slot of each row."""
    flat = indices.reshape(-1).tolist()
    return sorted(range(len(flat)), key=lambda slot: (flat[slot], slot))


def naive_unpermute(rows, order, probs, num_tokens):
    """out[t] = sum_k probs[t, k] * rows[position of slot t*K+k], dropped positions adding 0."""
    top_k = probs.shape[1]
    out = rows.new_zeros(num_tokens, rows.shape[1])
    for position, slot in enumerate(order[: rows.shape[0]]):
        out[slot // top_k] = out[slot // top_k] + probs[slot // top_k, slot % top_k] * rows[position]
    return out


@pytest.mark.parametrize("shape,keep", [((6, 2), None), ((6, 2), 9), ((6, 2), 0), ((6,), None), ((6, 3), 12)])
def test_moe_permute_unpermute(npu, shape, keep):
    tokens = rand(6, 8, dtype=torch.bfloat16)
    indices = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    probs = torch.rand(6, indices.numel() // 6, generator=torch.Generator().manual_seed(2)).requires_grad_()
    permuted, order = ops.moe_token_permute(tokens, indices, keep, backend="npu")
    out = ops.moe_token_unpermute(permuted * 2 + 1, order, probs, backend="npu")  # "* 2 + 1": the experts
    want = naive_order(indices)
    kept = len(want) if keep is None else keep
    tr, pr = leaves(tokens, probs)
    ref_rows = tr[[slot // probs.shape[1] for slot in want[:kept]]]
    ref = naive_unpermute(ref_rows * 2 + 1, want, pr, 6)
    assert order.dtype == torch.int32 and order.tolist() == want
    assert permuted.dtype == torch.bfloat16 and torch.equal(permuted.double(), ref_rows.detach())
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16)
    if kept:
        check_grads(out, ref, [tokens, probs], [tr, pr], torch.bfloat16)
        assert called(npu, "npu_moe_token_unpermute")[0]["probs"].dtype == torch.bfloat16


def test_moe_float32_tokens_use_reference(npu):
    tokens, indices = torch.randn(4, 8), torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    ours = ops.moe_token_permute(tokens, indices, backend="npu")
    ref = ops.moe_token_permute(tokens, indices, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True)) and not npu.calls


# ----------------------------------------------------------------------------- grouped matmul


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("groups,list_type,as_tensor", [([2, 2, 5], 0, True), ([3, 0, 4], 1, False), ([1, 5, 5], 0, False)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_matmul(npu, dtype, groups, list_type, as_tensor, with_bias):
    x, w = rand(7, 16, dtype=dtype, seed=1), rand(3, 16, 8, dtype=dtype, seed=2)
    bias = rand(3, 8, dtype=dtype, seed=3) if with_bias else None
    group_list = torch.tensor(groups) if as_tensor else groups
    out = ops.grouped_matmul(x, w, group_list, group_list_type=list_type, bias=bias, backend="npu")
    xr, wr, *br = leaves(x, w, *([bias] if with_bias else []))
    ends = groups if list_type == 0 else [sum(groups[: i + 1]) for i in range(3)]
    rows = []
    for e, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        rows.append(xr[start:end] @ wr[e] + (br[0][e] if br else 0))
    ref = torch.cat([*rows, xr.new_zeros(7 - ends[-1], 8)])  # rows past the last group are 0
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    check_grads(out, ref, [x, w, *([bias] if with_bias else [])], [xr, wr, *br], dtype)
    kinds = [args["group_type"] for args in called(npu, "npu_grouped_matmul")]
    assert kinds == [0, 0, 2]  # forward, dx, dw


def test_grouped_matmul_covering_no_row_uses_reference(npu):
    out = ops.grouped_matmul(torch.randn(3, 4), torch.randn(2, 4, 5), [0, 0], backend="npu")
    assert torch.equal(out, torch.zeros(3, 5)) and not npu.calls


def test_tolerances_cover_the_dtypes_used_here():
    assert all(dtype in TOLERANCES for dtype in HALF)
