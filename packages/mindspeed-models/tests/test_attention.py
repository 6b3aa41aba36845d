"""FlashAttention (our core attention) against megatron's own DotProductAttention and a naive softmax formula."""

from __future__ import annotations

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from mindspeed_kernels.testing import assert_close
from mindspeed_models.attention import FlashAttention
from mindspeed_models.runtime import ensure_parallel_state

HEADS, GROUPS, DIM = 4, 2, 8


@pytest.fixture(scope="module", autouse=True)
def megatron_state():
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from mindspeed_models.adaptor import install

    # DotProductAttention allocates from megatron's global buffer on the CUDA device and forks the
    # CUDA RNG tracker: the adaptor maps both onto CPU.
    install()
    ensure_parallel_state()
    model_parallel_cuda_manual_seed(1234)


def config(**kw) -> TransformerConfig:
    base = dict(num_layers=2, hidden_size=HEADS * DIM, num_attention_heads=HEADS, num_query_groups=GROUPS, kv_channels=DIM,
                attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True, cuda_graph_scope=[])  # fmt: skip
    return TransformerConfig(**{**base, **kw})


def qkv(sq: int, sk: int, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, batch, HEADS, DIM, generator=gen, requires_grad=True)
    k = torch.randn(sk, batch, GROUPS, DIM, generator=gen, requires_grad=True)
    v = torch.randn(sk, batch, GROUPS, DIM, generator=gen, requires_grad=True)
    return q, k, v


def run(module, q, k, v, mask=None, **kw):
    """(output, dq, dk, dv) for a fixed upstream gradient."""
    for t in (q, k, v):
        t.grad = None
    out = module(q, k, v, mask, **kw)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()


def naive(q, k, v, hidden: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(scale q k^T with hidden keys removed) v, K/V heads repeated; rows with no key give 0."""
    scale = DIM**-0.5 if scale is None else scale
    qb, kb, vb = (t.detach().permute(1, 2, 0, 3) for t in (q, k, v))
    kb, vb = (t.repeat_interleave(HEADS // GROUPS, dim=1) for t in (kb, vb))
    scores = (qb @ kb.transpose(-1, -2) * scale).masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    out = probs @ vb
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def test_causal_gqa_matches_dot_product_attention():
    cfg = config()
    ours = FlashAttention(cfg, 1, AttnMaskType.causal, "self")
    ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = qkv(7, 7)
    for a, b in zip(run(ours, q, k, v), run(ref, q, k, v), strict=True):
        assert_close(a, b)


def test_padding_mask_matches_dot_product_attention():
    cfg = config()
    ours = FlashAttention(cfg, 1, AttnMaskType.causal, "self")
    ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = qkv(6, 6)
    # megatron's convention: True = hidden; causal + right padding of the second sequence (length 4).
    keep = torch.tensor([[1] * 6, [1] * 4 + [0] * 2]).bool()
    mask = (~keep)[:, None, None, :] | torch.ones(6, 6, dtype=torch.bool).triu(1)
    for a, b in zip(run(ours, q, k, v, mask), run(ref, q, k, v, mask), strict=True):
        assert_close(a, b)


def test_fewer_queries_than_keys_is_top_left_causal():
    # megatron's DotProductAttention refuses causal masks with Sq != Skv; TransformerEngine's
    # "causal" is top-left aligned, "causal_bottom_right" bottom-right.
    q, k, v = qkv(3, 7)
    top_left = FlashAttention(config(), 1, AttnMaskType.causal, "self")
    assert_close(top_left(q, k, v, None), naive(q, k, v, _band(3, 7, 10**9)))
    bottom_right = FlashAttention(config(), 1, AttnMaskType.causal_bottom_right, "self")
    assert_close(bottom_right(q, k, v, None), naive(q, k, v, _band(3, 7, 10**9, bottom_right=True)))


def test_packed_sequences_match_each_sequence_alone():
    cfg = config()
    ours = FlashAttention(cfg, 1, AttnMaskType.causal, "self")
    ref = DotProductAttention(cfg, 1, AttnMaskType.causal, "self")
    lengths = [3, 5, 2]
    q, k, v = qkv(sum(lengths), sum(lengths), batch=1)
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5)
    packed = ours(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=params)
    assert packed.shape == (10, HEADS * DIM)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        alone = ref(q[start:end], k[start:end], v[start:end], None)[:, 0]
        assert_close(packed[start:end], alone)


def _band(sq: int, sk: int, left: int, bottom_right: bool = False) -> torch.Tensor:
    i = torch.arange(sq)[:, None] + (sk - sq if bottom_right else 0)
    j = torch.arange(sk)[None, :]
    return (j > i) | (j < i - left)


@pytest.mark.parametrize("layer", [1, 2])
def test_sliding_window_only_on_selected_layers(layer):
    cfg = config(window_size=(2, 0), window_attn_skip_freq=[0, 1])
    module = FlashAttention(cfg, layer, AttnMaskType.causal, "self")
    q, k, v = qkv(8, 8)
    hidden = _band(8, 8, 2) if layer == 2 else _band(8, 8, 10**9)
    expected = naive(q, k, v, hidden)
    ours = run(module, q, k, v)
    assert_close(ours[0], expected)
    ref = run(DotProductAttention(cfg, layer, AttnMaskType.causal, "self"), q, k, v)
    for a, b in zip(ours, ref, strict=True):
        assert_close(a, b)
    # the explicit-mask path (a padding mask on top) agrees with the kernel's band mode
    keep_all = torch.zeros(2, 1, 1, 8, dtype=torch.bool)
    assert_close(module(q, k, v, keep_all), expected)


def test_window_with_fewer_queries_is_aligned_to_the_last_key_like_megatron():
    cfg = config(window_size=(2, 0))
    q, k, v = qkv(3, 7)
    expected = naive(q, k, v, _band(3, 7, 2, bottom_right=True))
    module = FlashAttention(cfg, 1, AttnMaskType.causal, "self")
    assert_close(module(q, k, v, None), expected)
    assert_close(module(q, k, v, torch.zeros(2, 1, 3, 7, dtype=torch.bool)), expected)
    assert_close(DotProductAttention(cfg, 1, AttnMaskType.causal, "self")(q, k, v, None), expected)


def test_packed_sequences_with_a_window():
    cfg = config(window_size=(1, 0))
    module = FlashAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = qkv(7, 7, batch=1)
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=4, max_seqlen_kv=4)
    packed = module(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=params)
    for start, end in ((0, 4), (4, 7)):
        n = end - start
        assert_close(packed[start:end], naive(q[start:end], k[start:end], v[start:end], _band(n, n, 1))[:, 0])


def test_mask_types_without_causality_and_softmax_scale():
    cfg = config()
    q, k, v = qkv(5, 5)
    hidden = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.6
    padding = FlashAttention(cfg, 1, AttnMaskType.padding, "self", softmax_scale=0.2)
    assert_close(padding(q, k, v, hidden), naive(q, k, v, hidden, scale=0.2))
    no_mask = FlashAttention(cfg, 1, AttnMaskType.no_mask, "self")
    assert_close(no_mask(q, k, v, hidden), naive(q, k, v, torch.zeros(5, 5, dtype=torch.bool)))


def test_dropout_only_in_training():
    cfg = config(attention_dropout=0.5)
    module = FlashAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = qkv(6, 6)
    evaluated = module.eval()(q, k, v, None)
    assert_close(evaluated, FlashAttention(config(), 1, AttnMaskType.causal, "self")(q, k, v, None))
    assert not torch.allclose(module.train()(q, k, v, None), evaluated)


def test_bad_arguments():
    cfg = config()
    module = FlashAttention(cfg, 1, AttnMaskType.causal, "self")
    q, k, v = qkv(4, 4)
    with pytest.raises(ValueError, match="attention_bias"):
        module(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(TypeError, match="attention_mask must be bool"):
        module(q, k, v, torch.zeros(2, 1, 4, 4))
    cu = torch.tensor([0, 4], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=4, max_seqlen_kv=4)
    with pytest.raises(ValueError, match="packed sequences"):
        module(q[:, 0], k[:, 0], v[:, 0], torch.zeros(4, 4, dtype=torch.bool), packed_seq_params=params)
    with pytest.raises(ValueError, match="qkv_format"):
        module(q[:, 0], k[:, 0], v[:, 0], None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))
    with pytest.raises(ValueError, match="softmax_type"):
        FlashAttention(config(softmax_type="off-by-one"), 1, AttnMaskType.causal, "self")
