"""The cuda backend: table completeness (both accelerator backends), the fit predicates, and the
CUDA code paths' plumbing run on CPU (torch implements the same kernels there), against naive
formulas written here. Numeric tests on a GPU are skipped without one."""

from __future__ import annotations

import pytest
import torch
from kernels_naive import naive_attention

from mindspeed_kernels import ops, registry
from mindspeed_kernels.backends import cuda, npu, reference
from mindspeed_kernels.backends.cuda import attention as cuda_attention
from mindspeed_kernels.backends.cuda import grouped_mm as cuda_gmm
from mindspeed_kernels.backends.cuda import norm as cuda_norm
from mindspeed_kernels.ops.attention import NO_LIMIT
from mindspeed_kernels.testing import assert_close, assert_error_within

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def rand(*shape, dtype=torch.float32, seed=0, device="cpu"):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.to(device=device, dtype=dtype).requires_grad_()


def leaves(*xs):
    return [x.detach().double().cpu().requires_grad_() for x in xs]


def compare_grads(out, ref, ins, ref_ins, dtype):
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = torch.autograd.grad((out.double().cpu() * g).sum(), ins)
    want = torch.autograd.grad((ref * g).sum(), ref_ins)
    for a, b in zip(got, want, strict=True):
        assert_close(a.cpu(), b, dtype)


# ----------------------------------------------------------------------------- tables


@pytest.mark.parametrize("backend", [npu, cuda], ids=["npu", "cuda"])
def test_tables_cover_exactly_the_ops(backend):
    assert set(backend.OPS) == set(registry.OP_NAMES)
    assert all(callable(fn) for fn in backend.OPS.values())


def test_cuda_table_names_the_reference_where_eager_is_the_fast_path():
    own = {"rms_norm": cuda_norm.rms_norm, "flash_attention": cuda_attention.flash_attention,
           "grouped_matmul": cuda_gmm.grouped_matmul}
    for op, fn in cuda.OPS.items():
        assert fn is own.get(op, reference.OPS[op]), op


def test_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda.available().startswith("torch.cuda.is_available() is False")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda.available() is None


def test_explicit_cuda_without_a_device_raises(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    registry.reset()
    try:
        with pytest.raises(registry.BackendUnavailable, match="MINDSPEED_KERNEL_BACKEND.*torch.cuda.is_available"):
            ops.rms_norm(torch.randn(2, 4), backend="cuda")
    finally:
        registry.reset()


# ----------------------------------------------------------------------------- fit predicates


FLASH_OK = dict(device_type="cuda", capability=(9, 0), dtype=torch.bfloat16, layout="BSND", sparse_mode=2,
                has_mask=False, has_alibi=False, pre_tokens=NO_LIMIT, next_tokens=NO_LIMIT, s_q=64, s_kv=64, d_qk=128,
                d_v=128)


@pytest.mark.parametrize("change,fits", [
    ({}, True),
    ({"sparse_mode": 3}, True),
    ({"sparse_mode": 0, "s_kv": 80}, True),
    ({"dtype": torch.float16, "capability": (8, 0)}, True),
    ({"device_type": "cpu", "capability": None}, False),
    ({"capability": (7, 5)}, False),
    ({"dtype": torch.float32}, False),
    ({"layout": "TND"}, False),
    ({"has_mask": True}, False),
    ({"has_alibi": True}, False),
    ({"sparse_mode": 1}, False),
    ({"sparse_mode": 4}, False),
    ({"sparse_mode": 2, "s_kv": 80}, False),  # top-left vs bottom-right would differ
    ({"sparse_mode": 3, "s_q": 80}, False),
    ({"sparse_mode": 0, "pre_tokens": 4}, False),
    ({"d_v": 64}, False),
    ({"d_qk": 12, "d_v": 12}, False),
    ({"d_qk": 320, "d_v": 320}, False),
    ({"s_q": 0}, False),
])
def test_flash_fits(change, fits):
    assert cuda_attention.flash_fits(**{**FLASH_OK, **change}) is fits


GMM_OK = dict(device_type="cuda", capability=(9, 0), dtype=torch.bfloat16, rows=32, experts=4, k=64, n=128)


@pytest.mark.parametrize("change,fits", [
    ({}, True),
    ({"capability": (8, 0)}, True),
    ({"capability": (7, 5)}, False),
    ({"device_type": "cpu", "capability": None}, False),
    ({"dtype": torch.float16}, False),
    ({"dtype": torch.float32}, False),
    ({"k": 60}, False),
    ({"n": 12}, False),
    ({"rows": 0}, False),
    ({"experts": 0}, False),
])
def test_grouped_mm_fits(change, fits):
    assert cuda_gmm.grouped_mm_fits(**{**GMM_OK, **change}) is fits


def test_cpu_tensors_never_take_the_kernel_paths():
    q = k = v = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    out, lse = cuda.OPS["flash_attention"](q, k, v, "BNSD", 2)
    ref_out, ref_lse = reference.OPS["flash_attention"](q, k, v, "BNSD", 2)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


# ----------------------------------------------------------------------------- rms_norm (F.rms_norm runs on CPU)


def naive_rms(x, w, eps, offset):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * (w + 1 if offset else w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("compute_in_fp32", [True, False])
def test_rms_norm_module(dtype, offset, compute_in_fp32):
    x, w = rand(3, 2, 16, dtype=dtype), rand(16, dtype=dtype, seed=1)
    y = cuda_norm.rms_norm(x, w, 1e-5, add_rmsnorm_offset=offset, compute_in_fp32=compute_in_fp32)
    xr, wr = leaves(x, w)
    if compute_in_fp32:
        ref = naive_rms(xr, wr, 1e-5, offset)
    else:  # the formula in x's dtype, as the contract says
        ref = naive_rms(xr.to(dtype), wr.to(dtype), 1e-5, offset).double()
    assert y.dtype == dtype
    assert_close(y, ref, dtype)
    compare_grads(y, ref, (x, w), (xr, wr), dtype)


# ----------------------------------------------------------------------------- flash path plumbing (CPU kernel)






def shape_of(layout, b, n, s, d):
    return {"BNSD": (b, n, s, d), "BSND": (b, s, n, d), "BSH": (b, s, n * d), "SBH": (s, b, n * d)}[layout]


def check_flash(layout, causal, n_kv, dtype=torch.float32, device="cpu", s=6, d=8):
    n_q, scale = 4, 0.4
    q, k, v = (rand(*shape_of(layout, 2, n, s, d), dtype=dtype, seed=i, device=device)
               for i, n in enumerate((n_q, n_kv, n_kv)))
    out, lse = cuda_attention.flash_with_lse(q, k, v, layout, n_q, causal, scale, 0.0)
    qr, kr, vr = leaves(q, k, v)
    ref_out, ref_lse = naive_attention(qr, kr, vr, layout, n_q, n_kv, causal, scale)
    assert out.shape == ref_out.shape and out.dtype == dtype and lse.dtype == torch.float32
    g_out = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g_lse = torch.randn(ref_lse.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = torch.autograd.grad((out.double().cpu() * g_out).sum() + (lse.double().cpu() * g_lse).sum(), (q, k, v))
    want = torch.autograd.grad((ref_out * g_out).sum() + (ref_lse * g_lse).sum(), (qr, kr, vr))
    return (out.cpu(), lse.cpu(), *(g.cpu() for g in got)), (ref_out, ref_lse, *want)


@pytest.mark.parametrize("n_kv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["BNSD", "BSND", "BSH", "SBH"])
def test_flash_path_on_the_cpu_kernel(layout, causal, n_kv):
    for ours, ref in zip(*check_flash(layout, causal, n_kv), strict=True):
        assert_close(ours, ref, torch.float32)


# ----------------------------------------------------------------------------- grouped_mm path (CPU kernel, bfloat16)


@pytest.mark.parametrize("groups,list_type,as_tensor", [([2, 2, 5], 0, True), ([3, 0, 4], 1, False), ([1, 6, 6], 0, False)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_mm_path(groups, list_type, as_tensor, with_bias, device="cpu"):
    dtype = torch.bfloat16
    x, w = rand(7, 16, dtype=dtype, seed=1, device=device), rand(3, 16, 8, dtype=dtype, seed=2, device=device)
    bias = rand(3, 8, dtype=dtype, seed=3, device=device) if with_bias else None
    group_list = torch.tensor(groups, device=device) if as_tensor else groups
    out = cuda_gmm.grouped_mm_path(x, w, group_list, list_type, bias)
    xr, wr, *br = leaves(x, w, *([bias] if with_bias else []))
    ends = groups if list_type == 0 else [sum(groups[: i + 1]) for i in range(3)]
    pieces = [xr[a:b] @ wr[e] + (br[0][e] if br else 0) for e, (a, b) in enumerate(zip([0, *ends[:-1]], ends, strict=True))]
    ref = torch.cat([*pieces, xr.new_zeros(7 - ends[-1], 8)])
    assert out.dtype == dtype and out.shape == (7, 8)
    assert_close(out.cpu(), ref, dtype)
    compare_grads(out, ref, [x, w, *([bias] if with_bias else [])], [xr, wr, *br], dtype)


# ----------------------------------------------------------------------------- on a GPU


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["BSND", "SBH"])
def test_flash_on_cuda(layout, dtype):
    s, d = 128, 64
    assert cuda_attention.flash_fits(**{**FLASH_OK, "dtype": dtype, "layout": layout, "s_q": s, "s_kv": s, "d_qk": d,
                                        "d_v": d, "capability": torch.cuda.get_device_capability()})
    (out, lse, *grads), (ref_out, ref_lse, *ref_grads) = check_flash(layout, True, 2, dtype, "cuda", s=s, d=d)
    # FlashAttention's own criterion: error vs float64 at most twice the naive formula's in dtype
    q, k, v = (rand(*shape_of(layout, 2, n, s, d), dtype=dtype, seed=i, device="cuda") for i, n in enumerate((4, 2, 2)))
    low_out, low_lse = naive_attention(q, k, v, layout, 4, 2, True, 0.4)
    g_out = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g_lse = torch.randn(ref_lse.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    loss = (low_out * g_out.to("cuda", dtype)).sum() + (low_lse * g_lse.to("cuda", dtype)).sum()
    low_grads = torch.autograd.grad(loss, (q, k, v))
    for ours, exact, naive in zip((out, *grads), (ref_out, *ref_grads), (low_out, *low_grads), strict=True):
        assert_error_within(ours, naive.cpu(), exact)
    assert_close(lse, ref_lse, torch.float16)


@needs_cuda
def test_grouped_mm_on_cuda():
    test_grouped_mm_path([2, 2, 5], 0, True, True, device="cuda")


@needs_cuda
def test_ops_select_cuda_for_cuda_tensors():
    registry.reset()
    x = torch.randn(4, 16, device="cuda")
    assert_close(ops.rms_norm(x), naive_rms(x.double(), None, 1e-6, False), torch.float32)
    assert registry.select("rms_norm", x.device) is cuda.OPS["rms_norm"]
