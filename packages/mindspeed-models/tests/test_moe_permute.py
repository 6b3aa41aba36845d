"""moe_permute: megatron's fused-permutation hooks over mindspeed_kernels equal megatron's own unfused permute/unpermute.

Reference: megatron-core's ``moe_utils.permute`` / ``unpermute`` / ``sort_chunks_by_idxs`` with ``fused=False`` (its
torch implementation), on random routing maps with a variable number of experts per token (token dropping), an
expert nobody chose and a token with no expert; forward values and gradients.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe import moe_utils

from mindspeed_models import moe_permute


def _routing(tokens: int = 12, experts: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    routing_map = torch.rand(tokens, experts, generator=gen) < 0.35
    routing_map[:, 3] = False  # an expert with no token
    routing_map[5] = False  # a token whose every choice was dropped
    routing_map[7, :2] = True
    probs = torch.rand(tokens, experts, generator=gen) * routing_map
    return routing_map, probs


def test_permute_and_unpermute_equal_megatron_unfused():
    routing_map, probs = _routing()
    hidden = torch.randn(12, 5, generator=torch.Generator().manual_seed(1))
    outs = []
    for fn in ("ours", "megatron"):
        x, p = hidden.clone().requires_grad_(), probs.clone().requires_grad_()
        if fn == "ours":
            permuted, permuted_probs, rows = moe_permute.fused_permute_with_probs(x, p, routing_map, int(routing_map.sum()))
            back = moe_permute.fused_unpermute(permuted * 2.0, rows, restore_shape=x.shape)
            merged = moe_permute.fused_unpermute(permuted, rows, merging_probs=p, restore_shape=x.shape)
        else:
            permuted, permuted_probs, rows = moe_utils.permute(x, routing_map, probs=p, num_out_tokens=int(routing_map.sum()))
            back = moe_utils.unpermute(permuted * 2.0, rows, x.shape, routing_map=routing_map)
            merged = moe_utils.unpermute(permuted, rows, x.shape, probs=p, routing_map=routing_map)
        (permuted.pow(2).sum() + permuted_probs.sum() + back.sum() + merged.pow(2).sum()).backward()
        outs.append((permuted.detach(), permuted_probs.detach(), back.detach(), merged.detach(), x.grad, p.grad))
    for ours, theirs in zip(*outs, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_sort_chunks_equal_megatron_unfused():
    x = torch.arange(20.0).view(10, 2)
    probs = torch.arange(10.0)
    split_sizes, order = torch.tensor([3, 0, 4, 3]), torch.tensor([2, 0, 3, 1])
    ours = moe_permute.fused_sort_chunks_by_index_with_probs(x, probs, split_sizes, order)
    theirs = moe_utils.sort_chunks_by_idxs(x, split_sizes, order, probs=probs, fused=False)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_install_fills_only_missing_hooks_and_is_idempotent():
    assert moe_permute.install() and moe_permute.install()
    for name, fn in moe_permute.FUSED.items():
        assert getattr(moe_utils, name) is fn
    assert moe_utils.fused_topk_with_score_function is None, "other fused helpers stay absent"


def test_num_out_tokens_mismatch_is_an_error():
    routing_map, _ = _routing()
    with pytest.raises(ValueError, match="num_out_tokens=1 but the routing map selects"):
        moe_permute.fused_permute(torch.randn(12, 5), routing_map, 1)
