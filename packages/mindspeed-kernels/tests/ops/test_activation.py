"""swiglu / geglu against ``act(gate) * up`` on ``x.chunk(2, dim)`` written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mindspeed_kernels.ops import geglu, swiglu
from mindspeed_kernels.testing import assert_close

OPS = {
    "swiglu": (lambda x, dim: swiglu(x, dim), lambda a: F.silu(a)),
    "geglu": (lambda x, dim: geglu(x, dim), lambda a: F.gelu(a)),
    "geglu_tanh": (lambda x, dim: geglu(x, dim, "tanh"), lambda a: F.gelu(a, approximate="tanh")),
}


def naive(x, dim, act):
    gate, up = x.chunk(2, dim)
    return act(gate) * up


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [-1, 1])
def test_forward_and_grad_match_fp32_formula(name, dtype, dim):
    op, act = OPS[name]
    g = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(3, 8, 6, generator=g)).to(dtype).requires_grad_(True)
    out = op(x, dim)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(grad)

    x32 = x.detach().float().requires_grad_(True)
    expected = naive(x32, dim, act)
    expected.backward(grad.float())
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected)
    assert_close(x.grad, x32.grad)


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dim", [0, -1])
def test_fp32_input_gradient_is_autograds_bitwise(name, dim):
    # the backward runs the activation's backward in place over g * up in the input gradient: each
    # element must be read before it is overwritten, across vector widths and threads' ranges alike
    op, act = OPS[name]
    g = torch.Generator().manual_seed(1)
    shape = (2, 64, 300) if dim == 0 else (64, 600)
    x = (2 * torch.randn(shape, generator=g)).requires_grad_(True)
    out = op(x, dim)
    grad = torch.randn(out.shape, generator=g)
    (ours,) = torch.autograd.grad(out, x, grad)
    x_ref = x.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(naive(x_ref, dim, act), x_ref, grad)
    assert torch.equal(ours, expected)


def test_gate_is_the_first_half():
    x = torch.tensor([[2.0, 0.0, 3.0, 5.0]])  # gate = [2, 0], up = [3, 5]
    assert_close(swiglu(x), torch.tensor([[3 * 2 / (1 + torch.exp(torch.tensor(-2.0)).item()), 0.0]]))


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("dim", [0, -1])
def test_gradcheck_float64(name, dim):
    op, _ = OPS[name]
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op(t, dim), (x,))


def test_backward_keeps_only_the_input():
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu(x)
    assert len(saved) == 1 and saved[0] is x


def test_empty_gate():
    assert swiglu(torch.ones(3, 0)).shape == (3, 0)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: swiglu(torch.ones(2, 5)), ValueError, r"swiglu: x.shape\[-1\]=5 must be even"),
        (lambda: geglu(torch.ones(3, 4), dim=0), ValueError, r"geglu: x.shape\[0\]=3 must be even"),
        (lambda: swiglu(torch.ones(2, 4), dim=2), ValueError, r"swiglu: dim=2 is out of range for x with 2 dimensions"),
        (lambda: swiglu(torch.ones(2, 4), dim=1.0), ValueError, r"dim=1.0 is out of range"),
        (lambda: swiglu(torch.ones(2, 4, dtype=torch.int64)), TypeError, r"swiglu: x must be a floating-point .*torch.int64"),
        (lambda: geglu([1.0, 2.0]), TypeError, r"geglu: x must be a floating-point tensor, got list"),
        (lambda: geglu(torch.ones(2, 4), approximate="erf"), ValueError, r"approximate='erf' must be one of 'none', 'tanh'"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
