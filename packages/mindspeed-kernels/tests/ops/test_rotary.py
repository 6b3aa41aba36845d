"""rotary_pos_emb against per-channel rotate-half / interleaved formulas written out here."""

from __future__ import annotations

import pytest
import torch

from mindspeed_kernels.ops import rotary_pos_emb
from mindspeed_kernels.testing import assert_close


def naive_half(x, cos, sin):
    """out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2 on the first R channels; the rest copied."""
    r = cos.shape[-1]
    h = r // 2
    x1, x2, rest = x[..., :h], x[..., h:r], x[..., r:]
    out1 = x1 * cos[..., :h] - x2 * sin[..., :h]
    out2 = x2 * cos[..., h:] + x1 * sin[..., h:]
    return torch.cat((out1, out2, rest), dim=-1)


def naive_interleaved(x, cos, sin):
    """Pair (x[2i], x[2i+1]) -> (x[2i] c - x[2i+1] s, x[2i+1] c + x[2i] s) per channel."""
    r = cos.shape[-1]
    even, odd = x[..., 0:r:2], x[..., 1:r:2]
    out_even = even * cos[..., 0::2] - odd * sin[..., 0::2]
    out_odd = odd * cos[..., 1::2] + even * sin[..., 1::2]
    return torch.cat((torch.stack((out_even, out_odd), dim=-1).flatten(-2), x[..., r:]), dim=-1)


def _tables(seq, rot, interleaved, dtype=torch.float32):
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * (0.9 ** torch.arange(rot // 2, dtype=torch.float32))
    layout = angles.repeat_interleave(2, -1) if interleaved else torch.cat((angles, angles), -1)
    return layout.cos().to(dtype), layout.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot", [8, 4])  # full and partial rotary (D = 8)
def test_sbnd_forward_and_grad(dtype, interleaved, rot):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 3, 8, generator=g).to(dtype).requires_grad_(True)
    cos, sin = _tables(5, rot, interleaved)
    cos, sin = cos[:, None, None, :], sin[:, None, None, :]
    out = rotary_pos_emb(x, cos, sin, interleaved)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    out.backward(grad)

    x32 = x.detach().float().requires_grad_(True)
    expected = (naive_interleaved if interleaved else naive_half)(x32, cos, sin)
    expected.backward(grad.float())
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, expected)
    assert_close(x.grad, x32.grad)
    assert torch.equal(out[..., rot:], x[..., rot:])  # passed through bit for bit


@pytest.mark.parametrize("x_shape, cos_view", [((2, 5, 3, 6), (5, 1, 6)), ((2, 3, 5, 6), (5, 6)), ((5, 6), (5, 6))])
def test_broadcasting_layouts(x_shape, cos_view):
    x = torch.randn(x_shape)
    cos, sin = _tables(5, 6, False)
    out = rotary_pos_emb(x, cos.view(cos_view), sin.view(cos_view))
    assert_close(out, naive_half(x, cos.view(cos_view), sin.view(cos_view)))


def test_interleaved_is_complex_multiplication():
    x = torch.randn(4, 2, 6, dtype=torch.float64)
    angles = torch.rand(4, 1, 3, dtype=torch.float64) * 6
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    expected = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (3, 2))) * torch.polar(torch.ones_like(angles), angles))
    assert_close(rotary_pos_emb(x, cos, sin, interleaved=True), expected.flatten(-2))


def test_half_precision_tables_are_accepted():
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    cos, sin = _tables(3, 4, False, torch.bfloat16)
    assert_close(rotary_pos_emb(x, cos, sin), naive_half(x.float(), cos.float(), sin.float()))


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_float64(interleaved):
    x = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    cos = torch.randn(3, 1, 4, dtype=torch.float64, requires_grad=True)
    sin = torch.randn(3, 1, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, s: rotary_pos_emb(a, c, s, interleaved), (x, cos, sin))


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradcheck_float64_constant_tables(interleaved):
    # constant cos/sin (the usual case) take the analytic backward, not autograd's replay
    x = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(3, 1, 4, dtype=torch.float64), torch.randn(3, 1, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: rotary_pos_emb(a, cos, sin, interleaved), (x,))


X = torch.ones(4, 2, 8)
C = torch.ones(4, 1, 8)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((X, torch.ones(4, 1, 7), torch.ones(4, 1, 7)), ValueError, r"cos.shape\[-1\]=7 \(rotary dim\) must be even and in 2..8"),
        ((X, torch.ones(4, 1, 10), torch.ones(4, 1, 10)), ValueError, r"cos.shape\[-1\]=10 .* in 2..8"),
        ((X, torch.ones(4, 1, 0), torch.ones(4, 1, 0)), ValueError, r"cos.shape\[-1\]=0"),
        ((X, C, torch.ones(4, 8)), ValueError, r"cos.shape=\(4, 1, 8\) and sin.shape=\(4, 8\) must be equal"),
        ((X, torch.ones(3, 1, 8), torch.ones(3, 1, 8)), ValueError, r"do not broadcast to x\[..., :8\] of shape \(4, 2, 8\)"),
        ((torch.ones(1, 2, 8), C, C), ValueError, r"cos/sin of shape \(4, 1, 8\) do not broadcast"),
        ((X, torch.ones(2, 4, 1, 8), torch.ones(2, 4, 1, 8)), ValueError, r"do not broadcast"),
        ((X.long(), C, C), TypeError, r"rotary_pos_emb: x must be a floating-point tensor .*torch.int64"),
        ((X, C.int(), C), TypeError, r"cos must be a floating-point tensor"),
        ((X, C, None), TypeError, r"sin must be a floating-point tensor .*got NoneType"),
        ((X, C, C.to("meta")), ValueError, r"sin is on meta but x is on cpu"),
        ((X, C, C, 1), TypeError, r"interleaved=1 must be True or False"),
    ],
)
def test_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        rotary_pos_emb(*args)
