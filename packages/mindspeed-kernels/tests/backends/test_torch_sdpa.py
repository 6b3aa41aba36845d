"""torch's fused attention kernels behind flash_attention: the fit predicates, which calls take
them (and which keep the blockwise reference), and their results against a naive formula
(kernels_naive.naive_attention: K/V repeated per query head, the whole score matrix in float64, softmax, matmul;
torch autograd of it for the gradients), through out and the log-sum-exp."""

from __future__ import annotations

import math

import pytest
import torch
from kernels_naive import layout_shape, naive_attention

from mindspeed_kernels import ops, registry
from mindspeed_kernels.backends import _torch_sdpa
from mindspeed_kernels.backends.cuda import attention as cuda_attention
from mindspeed_kernels.backends.reference import attention as ref_attention
from mindspeed_kernels.ops.attention import NO_LIMIT
from mindspeed_kernels.testing import assert_close, assert_error_within

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def auto_selection(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    registry.reset()
    yield
    registry.reset()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Names of the _torch_sdpa kernels called (forward runs and the lse gradient's rerun)."""
    calls = []
    for name, fn in list(_torch_sdpa.KERNELS.items()):
        monkeypatch.setitem(_torch_sdpa.KERNELS, name, lambda *a, name=name, fn=fn: calls.append(name) or fn(*a))
    return calls


# ----------------------------------------------------------------------------- fit predicates

CPU_OK = dict(device_type="cpu", dtype=torch.float32, layout="BSND", sparse_mode=2, has_mask=False, has_alibi=False,
              pre_tokens=NO_LIMIT, next_tokens=NO_LIMIT, s_q=7, s_kv=7, d_qk=5, d_v=5, dropout_p=0.0)


@pytest.mark.parametrize("change,fits", [
    ({}, True),
    ({"dtype": torch.bfloat16, "layout": "SBH", "sparse_mode": 3}, True),
    ({"dtype": torch.float16, "layout": "BNSD"}, True),
    ({"sparse_mode": 0, "s_kv": 11}, True),
    ({"device_type": "cuda"}, False),
    ({"device_type": "meta"}, False),
    ({"dtype": torch.float64}, False),  # float64 keeps the blockwise ground truth
    ({"layout": "TND"}, False),
    ({"has_mask": True, "sparse_mode": 0}, False),
    ({"has_alibi": True}, False),
    ({"sparse_mode": 1, "has_mask": True}, False),
    ({"sparse_mode": 4, "pre_tokens": 3, "next_tokens": 0}, False),
    ({"sparse_mode": 2, "s_kv": 11}, False),
    ({"sparse_mode": 3, "s_q": 11}, False),
    ({"dropout_p": 0.1}, False),
    ({"d_v": 3}, False),
    ({"s_q": 0, "s_kv": 0}, False),
])
def test_cpu_flash_fits(change, fits):
    assert ref_attention.cpu_flash_fits(**{**CPU_OK, **change}) is fits


EFFICIENT_OK = dict(device_type="cuda", capability=(9, 0), dtype=torch.float32, layout="BSND", sparse_mode=2,
                    has_mask=False, has_alibi=False, pre_tokens=NO_LIMIT, next_tokens=NO_LIMIT, s_q=64, s_kv=64,
                    d_qk=64, d_v=64)


@pytest.mark.parametrize("change,fits", [
    ({}, True),
    ({"capability": (7, 0), "layout": "SBH", "sparse_mode": 3}, True),
    ({"sparse_mode": 0, "s_kv": 80}, True),
    ({"dtype": torch.bfloat16}, False),  # the flash kernel's
    ({"dtype": torch.float64}, False),
    ({"device_type": "cpu", "capability": None}, False),
    ({"layout": "TND"}, False),
    ({"has_mask": True, "sparse_mode": 0}, False),
    ({"has_alibi": True}, False),
    ({"sparse_mode": 4}, False),
    ({"sparse_mode": 2, "s_kv": 80}, False),
    ({"d_v": 32}, False),
    ({"d_qk": 12, "d_v": 12}, False),
    ({"d_qk": 320, "d_v": 320}, False),
])
def test_efficient_fits(change, fits):
    assert cuda_attention.efficient_fits(**{**EFFICIENT_OK, **change}) is fits


def test_cuda_prefers_flash_and_takes_efficient_for_float32_only():
    half = {**EFFICIENT_OK, "dtype": torch.bfloat16}
    assert [name for name, fits in cuda_attention.PATHS if fits(**half)] == ["flash"]
    assert [name for name, fits in cuda_attention.PATHS if fits(**EFFICIENT_OK)] == ["efficient"]
    assert all(name in _torch_sdpa.KERNELS for name, _ in cuda_attention.PATHS)


# ----------------------------------------------------------------------------- inputs (the naive formula: kernels_naive)


def inputs(layout, n_q, n_kv, s_q, s_kv, d, dtype, device="cpu", batch=2):
    gen = torch.Generator().manual_seed(0)
    rnd = lambda n, s: torch.randn(layout_shape(layout, batch, n, s, d), generator=gen, dtype=torch.float64)  # noqa: E731
    return [x.to(device, dtype).requires_grad_() for x in (rnd(n_q, s_q), rnd(n_kv, s_kv), rnd(n_kv, s_kv))]


def loss_grads(out, lse, xs):
    """Gradients of a random linear function of out and lse (so both carry gradient)."""
    gen = torch.Generator().manual_seed(5)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(lse.device, lse.dtype)
    return torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), xs)


def results(layout, n_kv, s_q, s_kv, d, dtype, mode, device="cpu", call=None):
    """(ours, naive in dtype, naive in float64): each (out, lse, dq, dk, dv), on the CPU."""
    n_q, scale = 4, 0.35
    xs = inputs(layout, n_q, n_kv, s_q, s_kv, d, dtype, device)
    heads = {"num_heads": n_q} if layout in ("SBH", "BSH") else {}
    if call is None:
        out, lse = ops.flash_attention(*xs, layout, mode, scale=scale, **heads)
    else:
        out, lse = call(*xs, layout, n_q, mode != 0, scale, 0.0)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert lse.shape == (2, n_q, s_q)
    got = (out, lse, *loss_grads(out, lse, xs))
    low_in = [x.detach().clone().requires_grad_() for x in xs]
    exact_in = [x.detach().cpu().double().requires_grad_() for x in xs]
    low, exact = (naive_attention(*x, layout, n_q, n_kv, mode != 0, scale) for x in (low_in, exact_in))
    low, exact = (*low, *loss_grads(*low, low_in)), (*exact, *loss_grads(*exact, exact_in))
    return [tuple(t.detach().cpu() for t in r) for r in (got, low, exact)]


# ----------------------------------------------------------------------------- CPU: the reference backend's fused path

# (layout, n_kv, s_q, s_kv, d, sparse_mode): odd lengths and head dims, MHA/GQA/MQA, causal and not
FITTING = [
    ("BSND", 2, 13, 13, 5, 2),
    ("SBH", 4, 7, 7, 8, 3),
    ("BSH", 1, 9, 9, 6, 3),
    ("BNSD", 2, 7, 11, 5, 0),
    ("BSND", 4, 11, 7, 3, 0),
]


@pytest.mark.parametrize("layout,n_kv,s_q,s_kv,d,mode", FITTING)
def test_cpu_fused_path_float32(layout, n_kv, s_q, s_kv, d, mode, kernel_calls):
    ours, _, exact = results(layout, n_kv, s_q, s_kv, d, torch.float32, mode)
    assert kernel_calls and set(kernel_calls) == {"flash_cpu"}
    for got, want in zip(ours, exact, strict=True):
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout,n_kv,s_q,s_kv,d,mode", FITTING[:4])
def test_cpu_fused_path_half(layout, n_kv, s_q, s_kv, d, mode, dtype, kernel_calls):
    """Error against float64 at most twice the naive formula's in the low dtype (FlashAttention's criterion)."""
    ours, low, exact = results(layout, n_kv, s_q, s_kv, d, dtype, mode)
    assert set(kernel_calls) == {"flash_cpu"}
    for got, lo, ex in zip(ours, low, exact, strict=True):
        assert_error_within(got, lo, ex)


def test_cpu_inputs_with_a_strided_last_dim(kernel_calls):
    """torch's CPU kernel gets such inputs wrong (no check in the aten op); the path copies them first."""
    q, k, v = (torch.randn(2, 4, 8, 7, generator=torch.Generator().manual_seed(i)).transpose(-1, -2).requires_grad_()
               for i in range(3))
    out, lse = ops.flash_attention(q, k, v, "BNSD", 2)
    assert kernel_calls == ["flash_cpu"]
    xs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = naive_attention(*xs, "BNSD", 4, 4, True, 8**-0.5)
    for got, want in zip((out, lse, *loss_grads(out, lse, (q, k, v))), (ref_out, ref_lse, *loss_grads(ref_out, ref_lse, xs)),
                         strict=True):
        assert_close(got, want, torch.float32)


NOT_FITTING = {
    "atten_mask": dict(sparse_mode=0, atten_mask=torch.zeros(7, 7, dtype=torch.bool)),
    "mode1": dict(sparse_mode=1, atten_mask=torch.zeros(7, 7, dtype=torch.bool)),
    "alibi": dict(sparse_mode=2, alibi_slopes=torch.ones(4)),
    "band": dict(sparse_mode=4, pre_tokens=2, next_tokens=0),
    "dropout": dict(sparse_mode=2, dropout_p=0.2),
    "causal-sq-ne-skv": dict(sparse_mode=3, s_kv=9),
    "float64": dict(sparse_mode=2, dtype=torch.float64),
    "value-head-dim": dict(sparse_mode=0, d_v=3),
}


@pytest.mark.parametrize("case", list(NOT_FITTING))
def test_cpu_calls_the_kernel_cannot_express_stay_blockwise(case, kernel_calls, monkeypatch):
    kwargs = dict(NOT_FITTING[case])
    dtype, s_kv, d_v = kwargs.pop("dtype", torch.float32), kwargs.pop("s_kv", 7), kwargs.pop("d_v", 5)
    blockwise = []
    monkeypatch.setattr(ref_attention, "blockwise_attention",
                        lambda *a, real=ref_attention.blockwise_attention, **kw: blockwise.append(1) or real(*a, **kw))
    q = torch.randn(2, 7, 4, 5, dtype=dtype, requires_grad=True)
    k, v = torch.randn(2, s_kv, 2, 5, dtype=dtype), torch.randn(2, s_kv, 2, d_v, dtype=dtype)
    out, lse = ops.flash_attention(q, k, v, "BSND", **kwargs)
    (out.sum() + lse.sum()).backward()
    assert blockwise == [1] and kernel_calls == []


def test_tnd_stays_blockwise(kernel_calls):
    q, k, v = (torch.randn(9, 4, 5) for _ in range(3))
    ops.flash_attention(q, k, v, "TND", 3, actual_seq_qlen=[4, 9], actual_seq_kvlen=[4, 9])
    assert kernel_calls == []


def test_lse_gradient_reruns_the_kernel_only_when_lse_is_used(kernel_calls):
    q, k, v = inputs("BSND", 4, 2, 7, 7, 5, torch.float32)
    out, lse = ops.flash_attention(q, k, v, "BSND", 2)
    out.sum().backward()
    assert kernel_calls == ["flash_cpu"]
    out, lse = ops.flash_attention(q, k, v, "BSND", 2)
    lse.sum().backward()
    assert kernel_calls == ["flash_cpu"] * 3  # forward, then the lse gradient's one rerun


def test_explicit_reference_backend_and_cuda_fallback_take_it_too(kernel_calls):
    q, k, v = inputs("BNSD", 4, 4, 7, 7, 8, torch.float32)
    a = ops.flash_attention(q, k, v, "BNSD", 2, backend="reference")
    b = cuda_attention.flash_attention(q, k, v, "BNSD", 2)  # CPU tensors: neither CUDA kernel fits
    assert kernel_calls == ["flash_cpu", "flash_cpu"]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ----------------------------------------------------------------------------- the efficient kernel's plumbing, on CPU


def fake_efficient(q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
    """The documented contract of aten::_scaled_dot_product_efficient_attention, from the CPU flash
    kernel: equal head counts required, lse padded to a multiple of 32 along the sequence."""
    assert q.shape[1] == k.shape[1] == v.shape[1] and attn_bias is None and compute_log_sumexp
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)
    padded = -(-q.shape[2] // 32) * 32
    lse = torch.cat([lse, lse.new_full((*lse.shape[:2], padded - q.shape[2]), math.inf)], -1)
    return out, lse, torch.empty(()), torch.empty(())


@pytest.mark.parametrize("layout,n_kv,mode", [("BSND", 2, 2), ("SBH", 1, 0), ("BNSD", 4, 3)])
def test_efficient_path_plumbing_on_cpu(layout, n_kv, mode, monkeypatch):
    monkeypatch.setattr(_torch_sdpa, "EFFICIENT_OP", fake_efficient)
    call = lambda *a: _torch_sdpa.attention_with_lse("efficient", *a)  # noqa: E731
    ours, _, exact = results(layout, n_kv, 9, 9, 8, torch.float32, mode, call=call)
    for got, want in zip(ours, exact, strict=True):
        assert_close(got, want, torch.float32)


# ----------------------------------------------------------------------------- on a GPU


@needs_cuda
@pytest.mark.parametrize("layout,n_kv,mode", [("BSND", 2, 2), ("SBH", 4, 0), ("BSH", 1, 3)])
def test_float32_on_cuda_takes_the_efficient_kernel(layout, n_kv, mode, kernel_calls):
    """The CPU float32 criterion: out, lse and gradients within TOLERANCES[float32] of float64."""
    ours, _, exact = results(layout, n_kv, 40, 40, 64, torch.float32, mode, device="cuda")
    assert set(kernel_calls) == {"efficient"}
    for got, want in zip(ours, exact, strict=True):
        assert_close(got, want, torch.float32)
