"""Pack planning, neat-pack boundaries and cu_seqlens, checked through the attention kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mindspeed_train.data.packing import block_causal_mask, cu_seqlens_from_segments, plan_packs, segment_ids


def test_plan_packs_fits_every_sample_once():
    lengths = [5, 3, 7, 2, 8, 1, 4, 6]
    packs = plan_packs(lengths, 10)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 10 for p in packs)
    assert len(packs) == 4  # 36 tokens in 4 bins of 10: best-fit decreasing finds the minimum here
    assert packs == plan_packs(lengths, 10)  # deterministic
    with pytest.raises(ValueError, match="sample 1 has 12 tokens > seq_length=10"):
        plan_packs([3, 12], 10)


def test_cu_seqlens_and_mask_from_segments():
    seg = np.concatenate([segment_ids([3, 2, 4]), np.zeros(3, dtype=np.int32)])  # 3 padding tokens
    np.testing.assert_array_equal(cu_seqlens_from_segments(seg), [0, 3, 5, 9])
    mask = block_causal_mask(seg)
    naive = np.array([[seg[i] > 0 and seg[i] == seg[j] and j <= i for j in range(len(seg))] for i in range(len(seg))])
    np.testing.assert_array_equal(mask, naive)
    with pytest.raises(ValueError, match="neat-pack attention_mask"):
        cu_seqlens_from_segments([1, 1, 3])


def test_packed_attention_never_crosses_samples():
    ops = pytest.importorskip("mindspeed_kernels.ops")
    lengths = [3, 5, 4]
    cu = cu_seqlens_from_segments(segment_ids(lengths))
    torch.manual_seed(0)
    q, k, v = (torch.randn(sum(lengths), 2, 8, dtype=torch.float64) for _ in range(3))
    out, _ = ops.flash_attention(q, k, v, layout="TND", sparse_mode=2,
                                 actual_seq_qlen=cu[1:].tolist(), actual_seq_kvlen=cu[1:].tolist())
    for start, end in zip(cu[:-1], cu[1:], strict=True):
        sl = slice(int(start), int(end))
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1), is_causal=True).transpose(0, 1)
        torch.testing.assert_close(out[sl], ref, rtol=1e-10, atol=1e-10)
