"""RoPE frequency builders against the formulas written out here (plain RoPE, Llama-3.1, YaRN)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mindspeed_kernels import rope
from mindspeed_kernels.rope import RopeScaling
from mindspeed_kernels.testing import assert_close


def plain(dim, base):
    return [base ** (-(2 * i) / dim) for i in range(dim // 2)]


def llama3(dim, base, factor, low, high, context):
    """Llama-3.1's rule: keep short wavelengths, divide long ones by factor, blend in between."""
    out = []
    for f in plain(dim, base):
        wavelength = 2 * math.pi / f
        if wavelength < context / high:
            out.append(f)
        elif wavelength > context / low:
            out.append(f / factor)
        else:
            s = (context / wavelength - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return out


def yarn(dim, base, factor, context, beta_fast, beta_slow):
    """YaRN NTK-by-parts with DeepSeek-V3's integer ramp ends: pair i interpolates by
    gamma_i = clamp((i - lo) / (hi - lo), 0, 1), where d(r) is the pair rotating r times over the context."""

    def d(r):
        return dim * math.log(context / (2 * math.pi * r)) / (2 * math.log(base))

    lo, hi = max(math.floor(d(beta_fast)), 0), min(math.ceil(d(beta_slow)), dim - 1)
    hi = hi + 0.001 if hi == lo else hi
    out = []
    for i, f in enumerate(plain(dim, base)):
        gamma = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        out.append(f * (1 - gamma) + f / factor * gamma)
    return out


def mscale(s, m):
    return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1


def test_plain_inverse_frequencies():
    assert_close(rope.rope_inv_freq(16, 10000.0, dtype=torch.float64), torch.tensor(plain(16, 10000.0), dtype=torch.float64))
    default = rope.rope_inv_freq(128, 500000.0)
    assert default.dtype == torch.float32 and default.shape == (64,)
    assert_close(default, torch.tensor(plain(128, 500000.0)))


@pytest.mark.parametrize(
    "dim, base, factor, low, high, context", [(128, 500000.0, 8.0, 1.0, 4.0, 8192), (64, 10000.0, 4.0, 2.0, 8.0, 256)]
)
def test_llama3(dim, base, factor, low, high, context):
    got = rope.llama3_inv_freq(dim, base, factor, low, high, context, dtype=torch.float64)
    expected = torch.tensor(llama3(dim, base, factor, low, high, context), dtype=torch.float64)
    assert_close(got, expected)
    ratio = expected / torch.tensor(plain(dim, base), dtype=torch.float64)
    assert ratio.max() == 1 and ratio.min() == 1 / factor and ((ratio > 1 / factor) & (ratio < 1)).any()  # all three bands


@pytest.mark.parametrize(
    "dim, base, factor, context, beta_fast, beta_slow",
    [(64, 10000.0, 40.0, 4096, 32.0, 1.0), (128, 1000000.0, 4.0, 32768, 32.0, 1.0), (32, 10000.0, 16.0, 2048, 8.0, 2.0)],
)
def test_yarn(dim, base, factor, context, beta_fast, beta_slow):
    got = rope.yarn_inv_freq(dim, base, factor, context, beta_fast, beta_slow, dtype=torch.float64)
    assert_close(got, torch.tensor(yarn(dim, base, factor, context, beta_fast, beta_slow), dtype=torch.float64))
    # the paper's bands: pairs turning more than beta_fast times over the context keep their
    # frequency, those turning fewer than beta_slow times are interpolated by 1/factor
    base_freq = torch.tensor(plain(dim, base), dtype=torch.float64)
    turns = context * base_freq / (2 * math.pi)
    assert_close(got[turns > beta_fast], base_freq[turns > beta_fast])
    assert_close(got[turns < beta_slow], base_freq[turns < beta_slow] / factor)
    assert (turns > beta_fast).any() and (turns < beta_slow).any()


def test_yarn_factor_one_is_plain_rope():
    assert_close(rope.yarn_inv_freq(32, 10000.0, 1.0, 4096), rope.rope_inv_freq(32, 10000.0))


def test_yarn_magnitude_factors():
    for s, m, m_all in [(40.0, 1.0, 1.0), (40.0, 0.707, 1.0), (4.0, 1.0, 0.0), (0.5, 1.0, 1.0)]:
        assert rope.yarn_get_mscale(s, m) == pytest.approx(mscale(s, m))
        assert rope.yarn_attention_factor(s, m, m_all) == pytest.approx(mscale(s, m) / mscale(s, m_all))
        assert rope.yarn_softmax_scale_factor(s, m_all) == pytest.approx(mscale(s, m_all) ** 2)
    assert rope.yarn_attention_factor(4.0) == pytest.approx(0.1 * math.log(4.0) + 1)  # YaRN's default sqrt(1/t)
    assert rope.yarn_softmax_scale_factor(40.0, 1.0) == pytest.approx((0.1 * math.log(40.0) + 1) ** 2)  # DeepSeek-V3


@pytest.mark.parametrize("interleaved", [False, True])
def test_cos_sin_layouts(interleaved):
    inv_freq = torch.tensor([1.0, 0.1, 0.01])
    positions = torch.tensor([0, 1, 5, 100])
    cos, sin = rope.rope_cos_sin(inv_freq, positions, interleaved, attention_factor=1.5, dtype=torch.bfloat16)
    assert cos.shape == sin.shape == (4, 6) and cos.dtype == torch.bfloat16
    for p in range(4):
        for c in range(6):
            i = c // 2 if interleaved else c % 3
            angle = positions[p].item() * inv_freq[i].item()
            assert_close(cos[p, c], torch.tensor(1.5 * math.cos(angle)))
            assert_close(sin[p, c], torch.tensor(1.5 * math.sin(angle)))


def test_cos_sin_batched_positions_and_float64():
    inv_freq = rope.rope_inv_freq(8, 10000.0, dtype=torch.float64)
    positions = torch.tensor([[0, 1], [7, 3]])
    cos, sin = rope.rope_cos_sin(inv_freq, positions, dtype=torch.float64)
    assert cos.shape == (2, 2, 8)
    angles = positions[..., None].double() * inv_freq
    assert_close(cos, torch.cat((angles, angles), -1).cos())
    assert_close(sin, torch.cat((angles, angles), -1).sin())


def test_rope_frequencies_for_each_kind():
    inv, factor = rope.rope_frequencies(16, 10000.0)
    assert factor == 1.0 and torch.equal(inv, rope.rope_inv_freq(16, 10000.0))
    llama = RopeScaling("llama3", 8.0, 8192, low_freq_factor=1.0, high_freq_factor=4.0)
    inv, factor = rope.rope_frequencies(16, 500000.0, llama)
    assert factor == 1.0 and torch.equal(inv, rope.llama3_inv_freq(16, 500000.0, 8.0, 1.0, 4.0, 8192))
    ds = RopeScaling("yarn", 40.0, 4096, mscale=0.707, mscale_all_dim=1.0)
    inv, factor = rope.rope_frequencies(16, 10000.0, ds)
    assert factor == pytest.approx(mscale(40.0, 0.707) / mscale(40.0, 1.0))
    assert torch.equal(inv, rope.yarn_inv_freq(16, 10000.0, 40.0, 4096))


def test_scaling_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RopeScaling().factor = 2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "ntk"}, r"RopeScaling: kind='ntk' must be one of 'none', 'llama3', 'yarn'"),
        ({"factor": 2.0}, r"factor=2.0 has no effect with kind='none'"),
        ({"kind": "yarn", "factor": 0.0, "original_max_position_embeddings": 4}, r"factor=0.0 must be a finite number > 0"),
        ({"kind": "yarn", "factor": 4.0}, r"original_max_position_embeddings=None must be a positive int .* kind='yarn'"),
        ({"kind": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192.0}, r"_embeddings=8192.0 must be"),
        ({"kind": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "high_freq_factor": 1.0},
         r"high_freq_factor=1.0 must be a finite number > 1.0"),
        ({"kind": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": -1.0},
         r"low_freq_factor=-1.0 must be a finite number > 0"),
        ({"kind": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 1.0},
         r"beta_fast=1.0 must be a finite number > 1.0"),
        ({"kind": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_slow": 0},
         r"beta_slow=0 must be a finite number > 0"),
        ({"kind": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": -1.0},
         r"mscale=-1.0 must be a finite number >= 0"),
        ({"kind": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale_all_dim": float("inf")},
         r"mscale_all_dim=inf must be a finite number >= 0"),
    ],
)
def test_bad_scaling(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RopeScaling(**kwargs)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: rope.rope_inv_freq(7), ValueError, r"rope: dim=7 must be a positive even int"),
        (lambda: rope.rope_inv_freq(0), ValueError, r"dim=0 must be"),
        (lambda: rope.rope_inv_freq(8, 1.0), ValueError, r"rope: base=1.0 must be a finite number > 1"),
        (lambda: rope.llama3_inv_freq(8, 10000.0, 8.0, 4.0, 1.0, 8192), ValueError, r"high_freq_factor=1.0 must be"),
        (lambda: rope.yarn_inv_freq(8, 10000.0, 4.0, 0), ValueError, r"original_max_position_embeddings=0 must be"),
        (lambda: rope.rope_cos_sin(torch.ones(2, 2), torch.arange(3)), TypeError, r"inv_freq must be a 1-D floating-point"),
        (lambda: rope.rope_cos_sin(torch.ones(2), [0, 1]), TypeError, r"positions must be an integer or floating-point tensor"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _hf_inv_freq(kind, dim, base, max_positions, **params):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=2 * dim,
        num_attention_heads=2,
        head_dim=dim,
        rope_theta=base,
        max_position_embeddings=max_positions,
        rope_scaling={"rope_type": kind, **params},
    )
    return ROPE_INIT_FUNCTIONS[kind](config, None)


def test_llama3_matches_transformers():
    inv_freq, factor = _hf_inv_freq(
        "llama3", 128, 500000.0, 131072, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    ours = rope.rope_frequencies(128, 500000.0, RopeScaling("llama3", 8.0, 8192, low_freq_factor=1.0, high_freq_factor=4.0))
    assert_close(ours[0], inv_freq.float())
    assert ours[1] == factor


@pytest.mark.parametrize("m, m_all", [(1.0, 1.0), (0.707, 1.0), (1.0, 0.0)])
def test_yarn_matches_transformers(m, m_all):
    # max_position_embeddings = factor * original, so transformers' two ways of reading factor agree
    params = {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1}
    if m_all:
        params.update(mscale=m, mscale_all_dim=m_all)  # transformers ignores mscale without mscale_all_dim
    inv_freq, factor = _hf_inv_freq("yarn", 64, 10000.0, 40 * 4096, **params)
    ours = rope.rope_frequencies(64, 10000.0, RopeScaling("yarn", 40.0, 4096, mscale=m, mscale_all_dim=m_all))
    assert_close(ours[0], inv_freq.float())
    assert ours[1] == pytest.approx(factor)
