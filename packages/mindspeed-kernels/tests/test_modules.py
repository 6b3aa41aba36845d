"""nn.Module wrappers: forward equals the functional op, parameters and state_dict as documented."""

from __future__ import annotations

import math

import pytest
import torch

from mindspeed_kernels import modules, ops, rope
from mindspeed_kernels.testing import assert_close


@pytest.mark.parametrize("offset", [False, True])
def test_rms_norm_module(offset):
    layer = modules.RMSNorm(6, eps=1e-5, add_rmsnorm_offset=offset)
    assert [name for name, _ in layer.named_parameters()] == ["weight"]
    assert list(layer.state_dict()) == ["weight"]
    assert torch.equal(layer.weight, torch.full((6,), 0.0 if offset else 1.0))
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(2, 3, 6, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, ops.rms_norm(x, layer.weight, 1e-5, add_rmsnorm_offset=offset))
    scale = layer.weight + 1 if offset else layer.weight
    assert_close(out, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * scale)
    out.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


def test_rms_norm_module_dtype_and_compute_flag():
    layer = modules.RMSNorm(4, compute_in_fp32=False, dtype=torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    assert torch.equal(layer(x), ops.rms_norm(x, layer.weight, compute_in_fp32=False))
    assert "4, eps=1e-06" in repr(layer)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_embedding_module(interleaved):
    scaling = rope.RopeScaling("yarn", 4.0, 16, mscale=1.0, mscale_all_dim=0.0)
    layer = modules.RotaryEmbedding(8, 10000.0, scaling, interleaved)
    assert list(layer.state_dict()) == [] and list(layer.parameters()) == []
    positions = torch.arange(5)
    cos, sin = layer(positions)
    inv_freq, factor = rope.rope_frequencies(8, 10000.0, scaling)
    assert factor == pytest.approx(0.1 * math.log(4.0) + 1)
    assert torch.equal(layer.inv_freq, inv_freq)
    want_cos, want_sin = rope.rope_cos_sin(inv_freq, positions, interleaved, factor)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin) and cos.shape == (5, 8)
    x = torch.randn(5, 2, 8)
    out = ops.rotary_pos_emb(x, cos[:, None], sin[:, None], interleaved)
    assert out.shape == x.shape


def test_rotary_embedding_keeps_float32_frequencies_through_dtype_casts():
    layer = modules.RotaryEmbedding(16, 500000.0).to(torch.bfloat16)
    assert layer.inv_freq.dtype == torch.float32
    assert torch.equal(layer.inv_freq, rope.rope_inv_freq(16, 500000.0))
    cos, _ = layer(torch.arange(3), dtype=torch.bfloat16)
    assert cos.dtype == torch.bfloat16


def test_rotary_embedding_survives_meta_init_and_to_empty():
    layer = modules.RotaryEmbedding(8, 10000.0, device="meta")
    assert layer.inv_freq.is_meta
    layer.to_empty(device="cpu")
    assert torch.equal(layer.inv_freq, rope.rope_inv_freq(8, 10000.0))


def test_rotary_embedding_rejects_a_dict_config():
    with pytest.raises(TypeError, match=r"RotaryEmbedding: scaling must be a RopeScaling or None, got dict"):
        modules.RotaryEmbedding(8, scaling={"kind": "yarn"})


@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_module(bias):
    torch.manual_seed(0)
    layer = modules.GroupedLinear(3, 4, 2, bias=bias)
    expected_names = ["weight", "bias"] if bias else ["weight"]
    assert [name for name, _ in layer.named_parameters()] == expected_names
    assert list(layer.state_dict()) == expected_names
    assert layer.weight.shape == (3, 4, 2) and layer.weight.abs().max() <= 0.5  # 1/sqrt(in_features)
    x = torch.randn(6, 4)
    out = layer(x, [1, 1, 2], group_list_type=1)
    assert torch.equal(out, ops.grouped_matmul(x, layer.weight, [1, 2, 4], bias=layer.bias))
    expected = torch.cat([x[0:1] @ layer.weight[0], x[1:2] @ layer.weight[1], x[2:4] @ layer.weight[2], torch.zeros(2, 2)])
    if bias:
        expected[:4] += layer.bias[[0, 1, 2, 2]]
    assert_close(out, expected)
    out.sum().backward()
    assert layer.weight.grad.shape == (3, 4, 2)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: modules.RMSNorm(0), r"RMSNorm: hidden_size=0 must be a positive int"),
        (lambda: modules.GroupedLinear(2, 0, 3), r"GroupedLinear: in_features=0 must be a positive int"),
        (lambda: modules.GroupedLinear(True, 2, 3), r"GroupedLinear: num_groups=True must be a positive int"),
        (lambda: modules.RotaryEmbedding(7), r"rope: dim=7 must be a positive even int"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()
