"""linear against torch.nn.functional.linear and float64 matmuls; the CPU GEMM choice (oneDNN or torch's)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mindspeed_kernels.backends.reference import gemm as ref_linear
from mindspeed_kernels.ops import linear
from mindspeed_kernels.testing import assert_close

BIG = ((4, 96, 160), 320)  # 19.7M multiply-adds: above ONEDNN_MIN_MACS
SMALL = ((3, 5, 7), 6)
ONEDNN = torch.backends.mkldnn.is_available()


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    monkeypatch.delenv(ref_linear.ENV_VAR, raising=False)
    monkeypatch.setattr(ref_linear, "_resolved", {})


def _inputs(shape, n, dtype, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = torch.randn(*shape, generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).requires_grad_(True)
    b = torch.randn(n, generator=gen).to(dtype).requires_grad_(True) if bias else None
    return x, w, b


def _counting_onednn(monkeypatch) -> list[tuple]:
    calls = []
    real = torch.ops.mkldnn._linear_pointwise.default

    def counting(x, w, b, *rest):
        calls.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w, b, *rest)

    monkeypatch.setattr(ref_linear, "_resolved", {"onednn": counting})
    return calls


def test_big_sizes_cross_the_onednn_threshold():
    (shape, n), (small, m) = BIG, SMALL
    assert torch.Size(shape).numel() * n >= ref_linear.ONEDNN_MIN_MACS > torch.Size(small).numel() * m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", [BIG, SMALL], ids=["big", "small"])
def test_forward_and_gradients_equal_torch(dtype, bias, case):
    x, w, b = _inputs(*case, dtype, bias)
    out = linear(x, w, b)
    expected = F.linear(x, w, b)
    assert out.shape == expected.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, expected)
    g = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    params = [t for t in (x, w, b) if t is not None]
    for got, want in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(expected, params, g), strict=True):
        assert_close(got, want, scale=4.0 if dtype == torch.bfloat16 else 1.0)


def _gemm_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Worst-case float32 error of ``a @ b`` in any summation order: gamma_K * (|a| @ |b|)."""
    k, u = a.shape[-1], 2.0**-24
    return k * u / (1 - k * u) * (a.double().abs() @ b.double().abs())


def test_float32_results_are_within_the_float32_gemm_error_bound():
    """Forward, input gradient and weight gradient against float64 products: a GEMM that rounded its
    inputs to bf16/tf32 would miss this bound by orders of magnitude."""
    x, w, _ = _inputs(*BIG, torch.float32, bias=False)
    g = torch.randn(*BIG[0][:-1], BIG[1], generator=torch.Generator().manual_seed(2))
    out = linear(x, w)
    dx, dw = torch.autograd.grad(out, (x, w), g)
    x2, g2 = x.detach().reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    checks = {
        "forward": (out.reshape(-1, w.shape[0]), x2, w.detach().t()),
        "input gradient": (dx.reshape(-1, x.shape[-1]), g2, w.detach()),
        "weight gradient": (dw, g2.t(), x2),
    }
    for what, (got, a, b) in checks.items():
        err = (got.double() - a.double() @ b.double()).abs()
        assert bool((err <= _gemm_bound(a, b)).all()), f"{what}: max error {err.max().item():.3g}"


def test_transposed_weight_view_computes_x_at_w():
    x, w, _ = _inputs(*BIG, torch.float32, bias=False)
    w_kn = w.detach().t().contiguous()  # [K, N]: linear(x, w_kn.t()) is x @ w_kn
    assert_close(linear(x.detach(), w_kn.t()), x.detach() @ w_kn)


@pytest.mark.skipif(not ONEDNN, reason="this torch build has no oneDNN")
def test_onednn_runs_large_cpu_float32_calls_only(monkeypatch):
    calls = _counting_onednn(monkeypatch)
    x, w, b = _inputs(*BIG, torch.float32, bias=True)
    out = linear(x, w, b)
    assert len(calls) == 1
    out.backward(torch.ones_like(out))
    assert len(calls) == 2  # the input gradient; the weight gradient is torch's mm
    linear(*_inputs(*SMALL, torch.float32, bias=False)[:2])
    linear(*_inputs(*BIG, torch.float64, bias=False)[:2])
    linear(*_inputs(*BIG, torch.bfloat16, bias=False)[:2])
    assert len(calls) == 2


def test_env_torch_keeps_torchs_gemm_bitwise(monkeypatch):
    monkeypatch.setenv(ref_linear.ENV_VAR, "torch")
    x, w, b = _inputs(*BIG, torch.float32, bias=True)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    assert ref_linear._resolved == {"torch": None}


def test_unavailable_onednn_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    x, w, _ = _inputs(*BIG, torch.float32, bias=False)
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_bad_env_value_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(ref_linear.ENV_VAR, "mkl")
    with pytest.raises(ValueError, match=r"MINDSPEED_CPU_GEMM='mkl'.*onednn, torch"):
        linear(*_inputs(*BIG, torch.float32, bias=False)[:2])


def test_float64_gradcheck():
    x, w, b = _inputs((2, 3, 4), 5, torch.float64, bias=True)
    assert torch.autograd.gradcheck(lambda *t: linear(*t), (x, w, b))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(3, 4), torch.randn(5, 3), None), ValueError, r"weight must be \[N, K=4\]"),
        (lambda: (torch.randn(3, 4), torch.randn(5, 4), torch.randn(4)), ValueError, r"bias must be None or \[N=5\]"),
        (lambda: (torch.randn(3, 4), torch.randn(5, 4).double(), None), TypeError, r"weight \(torch.float64"),
        (lambda: (torch.arange(12).view(3, 4), torch.randn(5, 4), None), TypeError, r"x must be a floating-point"),
    ],
)
def test_bad_arguments_say_what_to_fix(make, error, match):
    with pytest.raises(error, match=match):
        linear(*make())
