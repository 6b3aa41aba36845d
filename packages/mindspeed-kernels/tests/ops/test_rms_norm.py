"""rms_norm against ``x * rsqrt(mean(x^2) + eps) * w`` written out here."""

from __future__ import annotations

import pytest
import torch

from mindspeed_kernels.ops import rms_norm
from mindspeed_kernels.testing import assert_close

HALF = (torch.bfloat16, torch.float16)


def naive(x, weight, eps, offset=False):
    y = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * ((1 + weight) if offset else weight)
    return y


def _inputs(dtype, shape=(2, 3, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(dtype)
    grad = torch.randn(shape, generator=g).to(dtype)
    return x, w, grad


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("with_weight, offset", [(True, False), (True, True), (False, False)])
def test_forward_and_grads_match_fp32_formula(dtype, with_weight, offset):
    x, w, grad = _inputs(dtype)
    x.requires_grad_(True)
    weight = w.clone().requires_grad_(True) if with_weight else None
    out = rms_norm(x, weight, 1e-5, add_rmsnorm_offset=offset)
    out.backward(grad)

    x32 = x.detach().float().requires_grad_(True)
    w32 = w.float().requires_grad_(True) if with_weight else None
    expected = naive(x32, w32, 1e-5, offset)
    expected.backward(grad.float())

    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, expected)
    assert_close(x.grad, x32.grad)
    if with_weight:
        assert weight.grad.dtype == dtype
        assert_close(weight.grad, w32.grad)


@pytest.mark.parametrize("dtype", HALF)
def test_compute_in_x_dtype_matches_low_precision_formula(dtype):
    x, w, grad = _inputs(dtype, seed=1)
    x.requires_grad_(True)
    weight = w.clone().requires_grad_(True)
    out = rms_norm(x, weight, compute_in_fp32=False)
    out.backward(grad)

    xl, wl = x.detach().clone().requires_grad_(True), w.clone().requires_grad_(True)
    expected = naive(xl, wl, 1e-6)  # every op in the half dtype
    expected.backward(grad)
    assert_close(out, expected)
    assert_close(x.grad, xl.grad)
    assert_close(weight.grad, wl.grad)


def test_fp16_squares_overflow_only_without_fp32_compute():
    x = torch.full((1, 4), 300.0, dtype=torch.float16)  # 300**2 > 65504, the float16 maximum
    assert_close(rms_norm(x), torch.ones(1, 4))
    assert_close(rms_norm(x, compute_in_fp32=False), naive(x, None, 1e-6))  # rsqrt(inf) = 0
    assert rms_norm(x, compute_in_fp32=False).abs().max() == 0


def test_fp32_weight_with_bf16_input_keeps_each_dtype():
    x, w, grad = _inputs(torch.bfloat16, seed=2)
    weight = w.float().requires_grad_(True)
    out = rms_norm(x, weight)
    out.backward(grad)
    w32 = w.float().requires_grad_(True)
    naive(x.float(), w32, 1e-6).backward(grad.float())
    assert out.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    assert_close(weight.grad, w32.grad, dtype=torch.float32)


def test_one_dimensional_input_and_zero_eps():
    x = torch.tensor([3.0, 4.0])
    assert_close(rms_norm(x, eps=0.0), x / (12.5**0.5))


def test_backward_keeps_only_input_weight_and_rstd():
    x, w, _ = _inputs(torch.bfloat16, shape=(8, 32))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rms_norm(x.requires_grad_(True), w.requires_grad_(True))
    assert sum(t.numel() * t.element_size() for t in saved) == 8 * 32 * 2 + 32 * 2 + 8 * 4


@pytest.mark.parametrize("with_weight, offset", [(True, False), (True, True), (False, False)])
def test_gradcheck_float64(with_weight, offset):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True) if with_weight else None
    inputs = (x, w) if with_weight else (x,)
    fn = lambda x, w=None: rms_norm(x, w, 1e-3, add_rmsnorm_offset=offset)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"x": torch.arange(4)}, TypeError, r"rms_norm: x must be a floating-point tensor .*torch.int64"),
        ({"x": torch.tensor(1.0)}, TypeError, r"x must be .* at least 1 dimension, got torch.float32 tensor of shape \(\)"),
        ({"weight": torch.ones(3)}, ValueError, r"weight.shape=\(3,\) must be \(4,\), the last dimension of x"),
        ({"weight": torch.ones(4, dtype=torch.int32)}, TypeError, r"weight must be a .* or None, got torch.int32"),
        ({"weight": torch.ones(4, device="meta")}, ValueError, r"weight is on meta but x is on cpu"),
        ({"eps": -1.0}, ValueError, r"eps=-1.0 must be a finite number >= 0"),
        ({"eps": float("nan")}, ValueError, r"eps=nan must be a finite number"),
        ({"eps": True}, ValueError, r"eps=True must be"),
        ({"compute_in_fp32": 1}, TypeError, r"compute_in_fp32=1 must be True or False"),
        ({"add_rmsnorm_offset": "yes"}, TypeError, r"add_rmsnorm_offset='yes' must be True or False"),
        ({"add_rmsnorm_offset": True, "weight": None}, ValueError, r"add_rmsnorm_offset=True .* weight is None"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"x": torch.ones(2, 4), "weight": torch.ones(4), **kwargs}
    with pytest.raises(error, match=match):
        rms_norm(args.pop("x"), args.pop("weight"), **args)
