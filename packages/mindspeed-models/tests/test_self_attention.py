"""KernelRopeSelfAttention's rotary tables: cos/sin reused while megatron hands back the same angles
tensor (its RotaryEmbedding.forward is lru-cached), recomputed for anything else."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import models_hf_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)

import mindspeed_models as mm  # noqa: E402
from mindspeed_models import self_attention as sa  # noqa: E402
from mindspeed_models.pretrained import load_state  # noqa: E402


def _angles(seq: int = 8, rot: int = 4) -> torch.Tensor:
    return (torch.arange(seq * rot, dtype=torch.float32) * 0.1).reshape(seq, 1, 1, rot)


def test_cos_sin_are_reused_for_the_same_angles_rows_and_mode_only():
    angles = _angles()
    cos, sin = sa._cos_sin(angles, 6)
    assert torch.equal(cos, torch.cos(angles[:6])) and torch.equal(sin, torch.sin(angles[:6]))
    again = sa._cos_sin(angles, 6)
    assert again[0] is cos and again[1] is sin
    assert sa._cos_sin(angles, 5)[0].shape[0] == 5
    equal_values = angles.clone()
    assert sa._cos_sin(equal_values, 6)[0] is not sa._cos_sin(angles, 6)[0]
    with torch.inference_mode():
        assert sa._cos_sin(angles, 6)[0].is_inference()
    assert not sa._cos_sin(angles, 6)[0].is_inference()


def test_learnt_angles_are_differentiated_every_call():
    angles = _angles().requires_grad_()
    for _ in range(2):  # never served from the cache
        cos, sin = sa._tables(angles, 6, None)
        (cos + sin).sum().backward()
    expected = torch.zeros_like(angles)
    expected[:6] = 2 * (torch.cos(angles[:6]) - torch.sin(angles[:6])).detach()
    torch.testing.assert_close(angles.grad, expected)


def test_gradients_through_the_shared_tables_match_transformers():
    """Training forward + backward with one cos/sin pair shared by every layer's q and k (after an
    inference-mode forward, whose tables are inference tensors): the input-embedding gradient equals
    transformers' for the same loss on the same weights."""
    cfg, hf_model = helpers.tiny_hf("llama")
    spec = mm.from_hf_config(cfg, perform_initialization=False)
    model = mm.build_model(spec)
    load_state(model, helpers.naive_state(cfg, hf_model, spec.padded_vocab_size))
    ids, mask = helpers.batch(cfg["vocab_size"])
    with torch.inference_mode():
        mm.logits(model.eval(), ids, mask)
    weights = torch.randn(*ids.shape, cfg["vocab_size"], generator=torch.Generator().manual_seed(1)) * mask[..., None]
    (mm.logits(model.train(), ids, mask) * weights).sum().backward()
    (hf_model.train()(input_ids=ids, attention_mask=mask).logits.float() * weights).sum().backward()
    ours = model.embedding.word_embeddings.weight.grad[: cfg["vocab_size"]]
    torch.testing.assert_close(ours, hf_model.model.embed_tokens.weight.grad, rtol=1e-4, atol=1e-5)
