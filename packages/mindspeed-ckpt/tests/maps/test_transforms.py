"""Tensor transforms against explicit formulas (torch only)."""

import pytest
import torch

from mindspeed_ckpt.maps import (
    concat_gate_up,
    interleave_qkv,
    pad_vocab,
    split_gate_up,
    split_qkv,
    unpad_vocab,
)


def _qkv_by_formula(q, k, v, heads, groups, head_dim):
    """Megatron's linear_qkv rows written out: for group g, q heads g*P .. g*P+P-1, then k head
    g, then v head g (P = heads // groups), each head a block of head_dim rows."""
    per = heads // groups
    rows = []
    for g in range(groups):
        for h in range(g * per, (g + 1) * per):
            rows.append(q[h * head_dim:(h + 1) * head_dim])
        rows.append(k[g * head_dim:(g + 1) * head_dim])
        rows.append(v[g * head_dim:(g + 1) * head_dim])
    return torch.cat(rows, dim=0)


@pytest.mark.parametrize("heads,groups,head_dim", [(4, 2, 8), (8, 1, 4), (6, 6, 2), (4, 4, 16)])
@pytest.mark.parametrize("bias", [False, True])
def test_interleave_matches_per_group_formula(heads, groups, head_dim, bias):
    g = torch.Generator().manual_seed(0)
    rest = () if bias else (24,)
    q = torch.randn(heads * head_dim, *rest, generator=g)
    k = torch.randn(groups * head_dim, *rest, generator=g)
    v = torch.randn(groups * head_dim, *rest, generator=g)
    fused = interleave_qkv(q, k, v, heads, groups, head_dim)
    assert torch.equal(fused, _qkv_by_formula(q, k, v, heads, groups, head_dim))
    q2, k2, v2 = split_qkv(fused, heads, groups, head_dim)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    # the pieces are fresh, contiguous tensors, not views of the fused one
    for t in (q2, k2, v2):
        assert t.is_contiguous() and t.untyped_storage().data_ptr() != fused.untyped_storage().data_ptr()


def test_interleave_rejects_heads_not_multiple_of_groups():
    t = torch.zeros(6, 4)
    with pytest.raises(ValueError, match="num_query_groups"):
        interleave_qkv(t, t[:4], t[:4], 3, 2, 2)


def test_gate_up_order_and_inverse():
    gate, up = torch.randn(5, 3), torch.randn(5, 3)
    fc1 = concat_gate_up(gate, up)
    assert torch.equal(fc1[:5], gate) and torch.equal(fc1[5:], up)
    g2, u2 = split_gate_up(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    with pytest.raises(ValueError, match="even"):
        split_gate_up(torch.zeros(3, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_padding_round_trip(dtype):
    emb = torch.randn(10, 4).to(dtype)
    padded = pad_vocab(emb, 16)
    assert padded.shape == (16, 4) and padded.dtype == dtype
    assert torch.equal(padded[:10], emb) and not padded[10:].any()
    assert torch.equal(unpad_vocab(padded, 10), emb)
    assert pad_vocab(emb, 10) is emb  # no padding: no copy
    with pytest.raises(ValueError, match="padded_vocab_size"):
        pad_vocab(emb, 9)
    with pytest.raises(ValueError, match="vocab_size"):
        unpad_vocab(emb, 11)
