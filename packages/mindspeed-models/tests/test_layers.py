"""RMSNorm, SwiGLU and RotaryAngles against megatron-core's own modules (torch norm, glu, RotaryEmbedding, YaRN)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from mindspeed_kernels.rope import RopeScaling
from mindspeed_kernels.testing import assert_close
from mindspeed_models.config import RopeSettings
from mindspeed_models.layers import RMSNorm, SwiGLU
from mindspeed_models.rope import RotaryAngles


def config(**kw) -> TransformerConfig:
    base = dict(num_layers=1, hidden_size=16, num_attention_heads=2, normalization="RMSNorm", gated_linear_unit=True,
                activation_func=F.silu, use_cpu_initialization=True, cuda_graph_scope=[])  # fmt: skip
    return TransformerConfig(**{**base, **kw})


def test_rms_norm_matches_megatrons_torch_norm():
    cfg = config()
    ours = RMSNorm(config=cfg, hidden_size=16, eps=1e-5)
    ref = WrappedTorchNorm(config=cfg, hidden_size=16, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.linspace(0.5, 1.5, 16))
        ref.weight.copy_(ours.weight)
    assert [n for n, _ in ours.named_parameters()] == ["weight"]
    x = torch.randn(3, 2, 16, requires_grad=True)
    assert_close(ours(x), ref(x))
    (g,) = torch.autograd.grad(ours(x).sum(), x)
    (g_ref,) = torch.autograd.grad(ref(x).sum(), x)
    assert_close(g, g_ref)
    assert ours.weight.sequence_parallel is False and ours.weight.dtype == torch.float32


def test_rms_norm_rejects_other_normalisations():
    with pytest.raises(ValueError, match="RMSNorm"):
        RMSNorm(config(normalization="LayerNorm"), 16)


def test_swiglu_is_megatrons_gated_silu():
    x = torch.randn(4, 2, 12)
    gate, up = x.chunk(2, -1)
    assert_close(SwiGLU(config())(x), F.silu(gate) * up)
    with pytest.raises(ValueError, match="SwiGLU"):
        SwiGLU(config(activation_func=F.gelu))
    with pytest.raises(ValueError, match="clamp"):
        SwiGLU(config(activation_func_clamp_value=5.0))


def test_plain_angles_match_megatron_rotary_embedding():
    ours = RotaryAngles(RopeSettings(16, 10000.0, None, 1.0, "default"))
    ref = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    assert_close(ours.get_freqs_non_repeated(12, offset=3), ref.get_freqs_non_repeated(12, offset=3))
    emb = ours(12)
    assert emb.shape == (12, 1, 1, 16) and emb.dtype == torch.float32
    assert torch.equal(emb[..., :8], emb[..., 8:])
    cos, sin = ours.get_cos_sin(5)
    assert_close(cos, torch.cos(ref.get_freqs_non_repeated(5)))


def test_llama3_angles_match_megatron_llama3_scaling():
    # megatron's RotaryEmbedding implements Llama-3.1 scaling with fixed low/high factors 1/4 and 8192.
    scaling = RopeScaling("llama3", 8.0, 8192, 1.0, 4.0)
    ours = RotaryAngles(RopeSettings(64, 500000.0, scaling, 1.0, "llama3"))
    ref = RotaryEmbedding(kv_channels=64, rotary_percent=1.0, rotary_base=500000, rope_scaling=True,
                          rope_scaling_factor=8.0, use_cpu_initialization=True)  # fmt: skip
    assert_close(ours.inv_freq, ref.inv_freq)
    assert_close(ours(20), _emb(ref, 20))


def _emb(ref: RotaryEmbedding, seq: int) -> torch.Tensor:
    freqs = ref.get_freqs_non_repeated(seq)
    return torch.cat((freqs, freqs), -1)[:, None, None, :]


def test_yarn_angles_and_factor_match_megatron_yarn():
    from mindspeed_models.adaptor import install

    install()  # YarnRotaryEmbedding moves its tables to the CUDA device on first use
    scaling = RopeScaling("yarn", 4.0, 64, beta_fast=32.0, beta_slow=1.0)
    ours = RotaryAngles(RopeSettings(32, 10000.0, scaling, 1.1386, "yarn"))
    ref = YarnRotaryEmbedding(kv_channels=32, rotary_base=10000.0, use_cpu_initialization=True, scaling_factor=4.0,
                              original_max_position_embeddings=64, beta_fast=32.0, beta_slow=1.0)  # fmt: skip
    emb, mscale = ref(40)
    assert_close(ours(40), emb)
    from mindspeed_models.config import _yarn_attention_factor

    assert _yarn_attention_factor({}, 4.0) == pytest.approx(mscale)


def test_inv_freq_survives_casts():
    ours = RotaryAngles(RopeSettings(16, 10000.0, None, 1.0, "default"))
    before = ours.inv_freq.clone()
    ours.to(torch.bfloat16)
    assert ours.inv_freq.dtype == torch.float32 and torch.equal(ours.inv_freq, before)
    assert not list(ours.state_dict())


def _saved_bytes_after_forward(model, ids, positions) -> tuple[torch.Tensor, int]:
    """(per-token loss, bytes of the distinct storages autograd holds once the forward is done)."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(ids, positions, None, labels=ids)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved if t.device.type == "cpu"}
    return loss, sum(storages.values())


def test_activation_recompute_keeps_numbers_and_drops_the_activation():
    """recompute_activation_function: the same loss and gradients as megatron's MLP, and after the
    forward the [s, b, ffn] activation of each dense MLP (and the silu(gate) the kernel keeps for
    float32 inputs) no longer holds memory (recomputed in backward)."""
    import mindspeed_models as mm

    cfg = dict(model_type="qwen2", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    runs = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = mm.build_model(mm.from_hf_config(cfg, recompute_activation_function=flag))
        assert type(model.decoder.layers[0].mlp).__name__ == ("ActivationRecomputeMLP" if flag else "SwiGLUMLP")
        ids = torch.randint(0, cfg["vocab_size"], (2, 12))
        positions = torch.arange(12).expand(2, 12)
        loss, held = _saved_bytes_after_forward(model, ids, positions)
        loss.sum().backward()
        runs[flag] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, held)
    (loss0, grads0, held0), (loss1, grads1, held1) = runs[False], runs[True]
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and all(torch.equal(grads0[n], grads1[n]) for n in grads0)
    activation = 2 * 12 * cfg["intermediate_size"] * 4  # [b, s, ffn] float32, per layer
    # per layer: the activation output and, in float32, the silu(gate) swiglu keeps for its backward
    assert held0 - held1 == cfg["num_hidden_layers"] * 2 * activation
