"""moe_token_permute / unpermute against Python loops over (token, slot) pairs written out here."""

from __future__ import annotations

import pytest
import torch

from mindspeed_kernels.ops import moe_token_permute, moe_token_unpermute
from mindspeed_kernels.testing import assert_close


def naive_order(indices):
    """Flat slot positions t*K+k sorted by expert id, ties in (token, slot) order."""
    rows = indices.reshape(indices.shape[0], -1).tolist()
    k = len(rows[0]) if rows else 1
    slots = [(expert, t * k + j) for t, row in enumerate(rows) for j, expert in enumerate(row)]
    return [flat for _, flat in sorted(slots, key=lambda pair: pair[0])], k  # sorted() is stable


def naive_permute(tokens, indices, num_out=None):
    order, k = naive_order(indices)
    order = order[:num_out] if num_out is not None else order
    return torch.stack([tokens[flat // k] for flat in order]) if order else tokens[:0]


def naive_unpermute(permuted, order, probs, num_tokens, k):
    out = [torch.zeros(permuted.shape[1], dtype=torch.float64) for _ in range(num_tokens)]
    for row in range(permuted.shape[0]):  # only the kept rows; dropped slots add nothing
        t, j = divmod(order[row], k)
        weight = probs[t, j].double() if probs is not None else 1.0
        out[t] = out[t] + weight * permuted[row].double()
    return torch.stack(out)


def _routing(num_tokens, top_k, num_experts, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_forward_and_grad(top_k, dtype):
    indices = _routing(6, top_k, 4, seed=top_k)
    tokens = torch.randn(6, 5).to(dtype).requires_grad_(True)
    permuted, sorted_indices = moe_token_permute(tokens, indices)
    order, _ = naive_order(indices)
    assert sorted_indices.dtype == torch.int32 and sorted_indices.tolist() == order
    assert permuted.dtype == dtype and torch.equal(permuted, naive_permute(tokens.detach(), indices))

    grad = torch.randn(permuted.shape).to(dtype)
    permuted.backward(grad)
    expected = torch.zeros(6, 5, dtype=torch.float64)
    for row, flat in enumerate(order):
        expected[flat // top_k] += grad[row].double()
    assert_close(tokens.grad, expected)


def test_top1_accepts_flat_indices():
    tokens, indices = torch.randn(5, 3), torch.tensor([2, 0, 2, 1, 0])
    permuted, sorted_indices = moe_token_permute(tokens, indices)
    assert sorted_indices.tolist() == [1, 4, 3, 0, 2]
    assert torch.equal(permuted, tokens[[1, 4, 3, 0, 2]])
    assert torch.equal(moe_token_permute(tokens, indices[:, None])[1], sorted_indices)


def test_dropped_slots_sort_last_and_are_cut():
    num_experts = 3
    indices = torch.tensor([[0, 2], [num_experts, 1], [1, num_experts], [2, 0]])  # 2 slots dropped
    tokens = torch.randn(4, 3, requires_grad=True)
    permuted, sorted_indices = moe_token_permute(tokens, indices, num_out_tokens=6)
    assert permuted.shape == (6, 3) and sorted_indices.shape == (8,)
    assert torch.equal(permuted, naive_permute(tokens.detach(), indices, 6))
    assert sorted_indices[6:].tolist() == [2, 5]  # the two dropped slots, in token order

    probs = torch.rand(4, 2, dtype=torch.float64, requires_grad=True)
    perm64 = permuted.detach().double().requires_grad_(True)
    out = moe_token_unpermute(perm64, sorted_indices, probs)
    expected = naive_unpermute(perm64, sorted_indices.tolist(), probs, 4, 2)
    assert_close(out, expected)
    grad = torch.randn(4, 3, dtype=torch.float64)
    got = torch.autograd.grad(out, (perm64, probs), grad)
    want = torch.autograd.grad(expected, (perm64, probs), grad)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    assert got[1][1, 0] == 0 and got[1][2, 1] == 0  # a dropped slot's weight has no effect


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unpermute_forward_and_grads(top_k, dtype):
    indices = _routing(5, top_k, 3, seed=10 + top_k)
    g = torch.Generator().manual_seed(3)
    permuted = torch.randn(5 * top_k, 4, generator=g).to(dtype).requires_grad_(True)
    probs = torch.rand(5, top_k, generator=g).requires_grad_(True)  # float32 router weights
    sorted_indices = moe_token_permute(torch.zeros(5, 1), indices)[1]
    out = moe_token_unpermute(permuted, sorted_indices, probs)
    grad = torch.randn(5, 4, generator=g).to(dtype)
    out.backward(grad)

    perm32 = permuted.detach().float().requires_grad_(True)
    probs32 = probs.detach().clone().requires_grad_(True)
    expected = naive_unpermute(perm32, sorted_indices.tolist(), probs32, 5, top_k)
    expected.backward(grad.double())
    assert out.dtype == dtype and out.shape == (5, 4)
    assert_close(out, expected)
    assert_close(permuted.grad, perm32.grad)
    assert_close(probs.grad, probs32.grad)  # float32: both sides see the same rounded inputs


def test_unpermute_without_probs_is_a_plain_inverse():
    indices = torch.tensor([3, 1, 1, 0])
    tokens = torch.randn(4, 2)
    permuted, sorted_indices = moe_token_permute(tokens, indices)
    assert torch.equal(moe_token_unpermute(permuted, sorted_indices), tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_with_uniform_probs(dtype):
    indices = _routing(7, 2, 4, seed=5)
    tokens = torch.randn(7, 6).to(dtype)
    permuted, sorted_indices = moe_token_permute(tokens, indices)
    out = moe_token_unpermute(permuted, sorted_indices, torch.full((7, 2), 0.5))
    assert torch.equal(out, tokens)  # (t/2 + t/2) is exact in float32, then rounded back


def test_no_tokens():
    permuted, sorted_indices = moe_token_permute(torch.ones(0, 3), torch.zeros(0, 2, dtype=torch.long))
    assert permuted.shape == (0, 3) and sorted_indices.shape == (0,)
    assert moe_token_unpermute(permuted, sorted_indices, torch.ones(0, 2)).shape == (0, 3)


def test_gradcheck_float64():
    indices = torch.tensor([[1, 0], [0, 2], [2, 1]])
    tokens = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(3, 2, dtype=torch.float64, requires_grad=True)
    sorted_indices = moe_token_permute(tokens, indices)[1]
    assert torch.autograd.gradcheck(lambda t: moe_token_permute(t, indices, 5)[0], (tokens,))
    permuted = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p, w: moe_token_unpermute(p, sorted_indices, w), (permuted, probs))


T, I2 = torch.ones(3, 4), torch.zeros(3, 2, dtype=torch.long)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: moe_token_permute(torch.ones(3), I2), ValueError, r"moe_token_permute: tokens must be a \[T, H\] tensor"),
        (lambda: moe_token_permute(T, I2.float()), TypeError, r"integer \[T, K\] or \[T\] tensor, got torch.float32"),
        (lambda: moe_token_permute(T, I2.bool()), TypeError, r"indices must be an integer"),
        (lambda: moe_token_permute(T, I2[:, :, None]), TypeError, r"indices must be .* shape \(3, 2, 1\)"),
        (lambda: moe_token_permute(T, I2[:2]), ValueError, r"indices.shape\[0\]=2 must equal tokens.shape\[0\]=3"),
        (lambda: moe_token_permute(T, I2.to("meta")), ValueError, r"indices is on meta but tokens is on cpu"),
        (lambda: moe_token_permute(T, I2[:, :0]), ValueError, r"indices.shape\[1\]=0 \(K\) must be >= 1"),
        (lambda: moe_token_unpermute(torch.ones(0, 4), torch.arange(0), torch.ones(3, 0)), ValueError, r"has K=0 slots"),
        (lambda: moe_token_permute(T, I2, 7), ValueError, r"num_out_tokens=7 must be None or an int in 0..6"),
        (lambda: moe_token_permute(T, I2, -1), ValueError, r"num_out_tokens=-1 must be"),
        (lambda: moe_token_permute(T, I2, 2.0), ValueError, r"num_out_tokens=2.0 must be"),
        (lambda: moe_token_unpermute(torch.ones(6), torch.arange(6)), ValueError, r"permuted_tokens must be an \[R, H\] tensor"),
        (lambda: moe_token_unpermute(torch.ones(6, 4), torch.ones(6)), TypeError, r"sorted_indices must be a 1-D integer tensor"),
        (lambda: moe_token_unpermute(torch.ones(7, 4), torch.arange(6)), ValueError, r"has 7 rows but sorted_indices only 6"),
        (lambda: moe_token_unpermute(torch.ones(6, 4), torch.arange(6), torch.ones(6)), TypeError, r"probs must be a .*\[T, K\]"),
        (lambda: moe_token_unpermute(torch.ones(6, 4), torch.arange(6), torch.ones(3, 2).long()), TypeError, r"probs must be"),
        (lambda: moe_token_unpermute(torch.ones(6, 4), torch.arange(6), torch.ones(2, 2)), ValueError,
         r"probs.shape=\(2, 2\) holds 4 weights but sorted_indices has 6"),
        (lambda: moe_token_unpermute(torch.ones(6, 4), torch.arange(6), torch.ones(3, 2, device="meta")), ValueError,
         r"probs is on meta"),
        (lambda: moe_token_unpermute(torch.ones(6, 4), torch.arange(6, device="meta")), ValueError,
         r"sorted_indices is on meta"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
