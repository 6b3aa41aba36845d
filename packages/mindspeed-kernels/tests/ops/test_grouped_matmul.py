"""grouped_matmul against a per-group ``x[a:b] @ w[e]`` loop written out here."""

from __future__ import annotations

import pytest
import torch

from mindspeed_kernels.ops import grouped_matmul
from mindspeed_kernels.testing import assert_close


def naive(x, weights, counts, bias=None):
    out = torch.zeros(x.shape[0], weights.shape[2], dtype=torch.float64)
    start = 0
    for e, n in enumerate(counts):
        for row in range(start, start + n):
            out[row] = x[row].double() @ weights[e].double()
            if bias is not None:
                out[row] += bias[e].double()
        start += n
    return out


def _ends(counts):
    ends, total = [], 0
    for n in counts:
        total += n
        ends.append(total)
    return ends


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_list_type", [0, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_and_grads(dtype, group_list_type, with_bias):
    counts = [3, 0, 2, 1]  # an empty group, and 2 trailing rows past the last group
    g = torch.Generator().manual_seed(group_list_type)
    x = torch.randn(8, 5, generator=g).to(dtype).requires_grad_(True)
    w = (0.5 * torch.randn(4, 5, 3, generator=g)).to(dtype).requires_grad_(True)
    b = torch.randn(4, 3, generator=g).to(dtype).requires_grad_(True) if with_bias else None
    group_list = torch.tensor(_ends(counts) if group_list_type == 0 else counts)
    out = grouped_matmul(x, w, group_list, group_list_type=group_list_type, bias=b)
    grad = torch.randn(8, 3, generator=g).to(dtype)
    out.backward(grad)

    leaves = [t.detach().double().requires_grad_(True) for t in (x, w) + ((b,) if with_bias else ())]
    expected = naive(leaves[0], leaves[1], counts, leaves[2] if with_bias else None)
    expected.backward(grad.double())
    assert out.dtype == dtype and out.shape == (8, 3)
    assert_close(out, expected)
    assert torch.equal(out[6:], torch.zeros(2, 3, dtype=dtype))
    for got, want in zip((x, w, b), leaves, strict=False):
        assert_close(got.grad, want.grad)
    assert torch.equal(w.grad[1], torch.zeros(5, 3, dtype=dtype))  # the empty group learns nothing
    assert torch.equal(x.grad[6:], torch.zeros(2, 5, dtype=dtype))


def test_list_group_list_and_all_rows_in_one_group():
    x, w = torch.randn(4, 3), torch.randn(2, 3, 2)
    assert_close(grouped_matmul(x, w, [0, 4]), naive(x, w, [0, 4]))
    assert_close(grouped_matmul(x, w, (4, 0), group_list_type=1), naive(x, w, [4, 0]))
    assert torch.equal(grouped_matmul(x, w, [0, 0]), torch.zeros(4, 2))


def test_gradcheck_float64():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: grouped_matmul(x, w, torch.tensor([2, 2, 5]), bias=b)
    assert torch.autograd.gradcheck(fn, (x, w, b))


X, W = torch.ones(5, 3), torch.ones(2, 3, 4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"x": torch.ones(5)}, TypeError, r"grouped_matmul: x must be .* got torch.float32 tensor of shape \(5,\)"),
        ({"x": X.long()}, TypeError, r"x must be a floating-point \[M, K\]"),
        ({"weights": torch.ones(2, 4, 4)}, ValueError, r"weights must be \[E, K=3, N\] to match x \[M, K\], got \(2, 4, 4\)"),
        ({"weights": torch.ones(3, 4)}, ValueError, r"weights must be \[E, K=3, N\]"),
        ({"weights": W.double()}, TypeError, r"weights \(torch.float64, cpu\) must have x's dtype and device"),
        ({"bias": torch.ones(2, 3)}, ValueError, r"bias must be \[E, N\] = \(2, 4\) or None, got \(2, 3\)"),
        ({"bias": torch.ones(2, 4).long()}, TypeError, r"bias must be a floating-point tensor on cpu"),
        ({"bias": torch.ones(2, 4, device="meta")}, TypeError, r"got torch.float32 on meta"),
        ({"group_list_type": 2}, ValueError, r"group_list_type=2 must be 0 \(cumulative ends\) or 1 \(counts\)"),
        ({"group_list_type": True}, ValueError, r"group_list_type=True must be"),
        ({"group_list": [3]}, ValueError, r"group_list has 1 entries but weights has 2 experts"),
        ({"group_list": [3, 2]}, ValueError, r"group_list=\[3, 2\] must be non-decreasing with group_list_type=0"),
        ({"group_list": [2, 6]}, ValueError, r"group_list=\[2, 6\] covers 6 rows but x has only 5"),
        ({"group_list": [3, 3], "group_list_type": 1}, ValueError, r"covers 6 rows but x has only 5"),
        ({"group_list": [-1, 2], "group_list_type": 1}, ValueError, r"group_list=\[-1, 2\] has a negative entry"),
        ({"group_list": torch.tensor([1.0, 2.0])}, TypeError, r"group_list must be a 1-D integer tensor .*torch.float32"),
        ({"group_list": torch.tensor([[1, 2]])}, TypeError, r"shape \(1, 2\)"),
        ({"group_list": [1.0, 2]}, TypeError, r"got \[1.0, 2\]"),
        ({"group_list": "12"}, TypeError, r"group_list must be"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"x": X, "weights": W, "group_list": [2, 5], **kwargs}
    with pytest.raises(error, match=match):
        grouped_matmul(args.pop("x"), args.pop("weights"), args.pop("group_list"), **args)
