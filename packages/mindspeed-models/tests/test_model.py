"""build_model + logits against transformers: same weights (renamed by hand in models_hf_helpers), fp32 logits.

Each case is a tiny random HF model (2 layers, 4 query heads / 2 KV heads, vocab 256); the batch
has two right-padded sequences of lengths 10 and 6, compared at their valid positions.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import models_hf_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)

import mindspeed_models as mm  # noqa: E402


def _ours(hf_config: dict, hf_model, **overrides):
    with warnings.catch_warnings():
        # transformers' own config dicts must map without "key not read" warnings.
        warnings.filterwarnings("error", message="config.json keys not read")
        spec = mm.from_hf_config(hf_config, perform_initialization=False, **overrides)
    model = mm.build_model(spec).eval()
    from mindspeed_models.pretrained import load_state

    load_state(model, helpers.naive_state(hf_config, hf_model, spec.padded_vocab_size))
    return spec, model


def _compare(hf_config, hf_model, **overrides) -> float:
    spec, model = _ours(hf_config, hf_model, **overrides)
    ids, mask = helpers.batch(hf_config["vocab_size"])
    with torch.no_grad():
        ours = mm.logits(model, ids, mask)
    assert ours.dtype == torch.float32 and ours.shape == (2, ids.shape[1], hf_config["vocab_size"])
    return helpers.assert_logits_match(ours, helpers.hf_logits(hf_model, ids, mask), mask)


CASES = {
    "llama": ("llama", {}),
    "llama_attention_and_mlp_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama_rope_llama3": (
        "llama",
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    ),
    "qwen2_bias_tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2_yarn": (
        "qwen2",
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 32}},
    ),
    "qwen2_sliding_window": ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),
    "qwen3_qk_norm_head_dim": ("qwen3", {"head_dim": 24}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case):
    model_type, overrides = CASES[case]
    hf_config, hf_model = helpers.tiny_hf(model_type, **overrides)
    _compare(hf_config, hf_model)


def test_features_are_exercised():
    """The cases above test what they claim: biases, tying, qk-norm, head_dim, scaled RoPE, windows."""
    cfg, _ = helpers.tiny_hf("qwen2", tie_word_embeddings=True)
    spec = mm.from_hf_config(cfg)
    assert spec.config.add_qkv_bias and spec.tie_word_embeddings
    model = mm.build_model(spec)
    assert "output_layer.weight" not in model.state_dict()
    cfg, _ = helpers.tiny_hf("qwen3", head_dim=24)
    spec = mm.from_hf_config(cfg)
    assert spec.config.qk_layernorm and spec.config.kv_channels == 24 != cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg, _ = helpers.tiny_hf("llama", **CASES["llama_rope_llama3"][1])
    rope = mm.build_model(mm.from_hf_config(cfg)).rotary_pos_emb
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    assert not torch.allclose(rope.inv_freq.double(), plain, rtol=1e-3)  # llama3 scaling changed frequencies
    cfg, _ = helpers.tiny_hf("qwen2", **CASES["qwen2_yarn"][1])
    assert mm.from_hf_config(cfg).rope.attention_factor > 1.1
    cfg, _ = helpers.tiny_hf("qwen2", **CASES["qwen2_sliding_window"][1])
    spec = mm.from_hf_config(cfg)
    assert spec.config.window_size == (2, 0) and spec.config.window_attn_skip_freq == [0, 1]


def test_left_padding_and_unmasked_batch():
    """Left padding (masked keys before the tokens) and a batch without any mask also match."""
    cfg, hf_model = helpers.tiny_hf("llama")
    _, model = _ours(cfg, hf_model)
    ids, mask = helpers.batch(cfg["vocab_size"])
    left_ids, left_mask = ids.flip(1), mask.flip(1)
    with torch.no_grad():
        ours = mm.logits(model, left_ids, left_mask)
    helpers.assert_logits_match(ours, helpers.hf_logits(hf_model, left_ids, left_mask), left_mask)
    with torch.no_grad():
        ours = mm.logits(model, ids)
    full = torch.ones_like(mask)
    helpers.assert_logits_match(ours, helpers.hf_logits(hf_model, ids, full), full)


def _count_kernel_rope(monkeypatch) -> list[tuple[int, ...]]:
    """Shapes of every tensor the attention layers rotate through mindspeed_kernels' rotary op."""
    from mindspeed_models import self_attention

    calls, real = [], self_attention.ops.rotary_pos_emb

    def spy(x, cos, sin, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, cos, sin, *args, **kwargs)

    monkeypatch.setattr(self_attention.ops, "rotary_pos_emb", spy)
    return calls


def test_rope_goes_through_the_kernels(monkeypatch):
    """q and k of every layer are rotated by ops.rotary_pos_emb (megatron's own rotation is bypassed, or the
    HF comparison above would see them rotated twice)."""
    cfg, hf_model = helpers.tiny_hf("qwen3")
    calls = _count_kernel_rope(monkeypatch)
    _compare(cfg, hf_model)
    seq = max(helpers.LENGTHS)
    assert calls == [(seq, 2, 4, 128), (seq, 2, 2, 128)] * cfg["num_hidden_layers"]


def test_packed_sequences_equal_separate_ones(monkeypatch):
    """GPTModel with THD packed_seq_params (our TND attention; RoPE positions restarting per sequence) = each
    sequence alone."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cfg, hf_model = helpers.tiny_hf("qwen2")
    _, model = _ours(cfg, hf_model)
    ids, mask = helpers.batch(cfg["vocab_size"])
    lengths = mask.sum(1).tolist()
    packed = torch.cat([ids[r, :n] for r, n in enumerate(lengths)])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                             max_seqlen_kv=max(lengths))  # fmt: skip
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    calls = _count_kernel_rope(monkeypatch)
    with torch.no_grad():
        out = model(packed, positions, None, packed_seq_params=params, runtime_gather_output=True)[0]
    assert len(calls) == 2 * cfg["num_hidden_layers"] and calls[0][0] == sum(lengths)
    with torch.no_grad():
        for r, n in enumerate(lengths):
            alone = mm.logits(model, ids[r : r + 1, :n])[0]
            torch.testing.assert_close(out[cu[r] : cu[r + 1]], alone, rtol=0, atol=1e-5)


def test_padded_vocabulary_is_cut_from_logits():
    cfg, hf_model = helpers.tiny_hf("llama", vocab_size=250)
    spec, model = _ours(cfg, hf_model, make_vocab_size_divisible_by=128)
    assert spec.padded_vocab_size == 256 and spec.vocab_size == 250
    assert model.embedding.word_embeddings.weight.shape[0] == 256
    ids, mask = helpers.batch(250)
    with torch.no_grad():
        ours = mm.logits(model, ids, mask)
    assert ours.shape[-1] == 250
    helpers.assert_logits_match(ours, helpers.hf_logits(hf_model, ids, mask), mask)


def test_logits_rejects_bad_input():
    cfg, hf_model = helpers.tiny_hf("llama")
    _, model = _ours(cfg, hf_model)
    with pytest.raises(ValueError, match="input_ids"):
        mm.logits(model, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        mm.logits(model, torch.zeros(1, 4))
    with pytest.raises(TypeError, match="input_ids"):
        mm.logits(model, [[1, 2]])
    with pytest.raises(ValueError, match="attention_mask"):
        mm.logits(model, torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 3))
    with pytest.raises(TypeError, match="ModelSpec"):
        mm.build_model(cfg)


def test_build_initialises_parameters_by_default():
    cfg, _ = helpers.tiny_hf("qwen3")
    model = mm.build_model(mm.from_hf_config(cfg))
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    assert qkv.abs().max() > 0 and abs(qkv.std().item() - cfg["initializer_range"]) < 0.01
    assert type(model.decoder.layers[0].self_attention.core_attention).__name__ == "FlashAttention"
    assert type(model.decoder.final_layernorm).__name__ == "RMSNorm"
