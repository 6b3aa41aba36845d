"""RoPE frequency builders: plain, Llama-3 and YaRN inverse frequencies, and cos/sin tables.

Units: an inverse frequency is radians per position; position ``p`` rotates channel pair ``i``
by ``p * inv_freq[i]``. Every builder returns ``inv_freq`` of shape [dim // 2] for a rotary
dimension ``dim`` (even), computed in float64 and returned as ``dtype`` (default float32).
:func:`rope_cos_sin` turns ``inv_freq`` into the cos/sin tables that
:func:`mindspeed_kernels.ops.rotary_pos_emb` consumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALING_KINDS = ("none", "llama3", "yarn")


def _describe(t: object) -> str:
    return f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_dim_base(dim: int, base: float) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
        raise ValueError(f"rope: dim={dim!r} must be a positive even int (the rotary dimension)")
    if not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 1:
        raise ValueError(f"rope: base={base!r} must be a finite number > 1 (rope_theta, e.g. 10000)")


def rope_inv_freq(dim: int, base: float = 10000.0, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``inv_freq[i] = base ** (-2i / dim)`` for ``i < dim // 2``: [dim // 2]."""
    _check_dim_base(dim, base)
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    return (1.0 / base**exponent).to(device=device, dtype=dtype)


def llama3_inv_freq(
    dim: int,
    base: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Llama-3.1 frequency scaling: [dim // 2].

    With ``L = original_max_position_embeddings`` and wavelength ``w = 2*pi / inv_freq``: long
    wavelengths (``w > L / low_freq_factor``) are divided by ``factor``, short ones
    (``w < L / high_freq_factor``) kept, and the band between blends the two with weight
    ``s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)`` on the kept value.
    The attention factor is 1. Arguments are checked by :class:`RopeScaling`.
    """
    RopeScaling("llama3", factor, original_max_position_embeddings, low_freq_factor, high_freq_factor)  # validates
    inv_freq = rope_inv_freq(dim, base, dtype=torch.float64)
    context_per_wave = original_max_position_embeddings * inv_freq / (2 * math.pi)  # = L / w
    smooth = ((context_per_wave - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0.0, 1.0)
    # smooth is 0 for long waves (fully scaled) and 1 for short ones (kept), as the piecewise rule says
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return scaled.to(device=device, dtype=dtype)


def _yarn_correction_dim(rotations: float, dim: int, base: float, context: int) -> float:
    """The (fractional) channel index whose wavelength fits ``rotations`` turns into ``context``."""
    return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(
    dim: int,
    base: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """YaRN ("NTK-by-parts") frequencies: [dim // 2].

    Pairs rotating more than ``beta_fast`` turns over the original context keep their frequency
    (extrapolation), pairs rotating fewer than ``beta_slow`` turns are divided by ``factor``
    (interpolation), with a linear ramp between. The ramp's ends are the channel indices
    ``floor(d(beta_fast))`` and ``ceil(d(beta_slow))`` clamped to ``[0, dim - 1]``, where
    ``d(r) = dim * ln(L / (2*pi*r)) / (2 * ln(base))`` and L = ``original_max_position_embeddings``
    (as DeepSeek-V3 and Megatron compute them). Pair with :func:`yarn_attention_factor`.
    """
    RopeScaling("yarn", factor, original_max_position_embeddings, beta_fast=beta_fast, beta_slow=beta_slow)  # validates
    inv_freq = rope_inv_freq(dim, base, dtype=torch.float64)
    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, base, original_max_position_embeddings)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, base, original_max_position_embeddings)), dim - 1)
    if high == low:
        high += 0.001  # a zero-width ramp would divide by zero; this makes it a step
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0.0, 1.0)
    # ramp is 0 for fast (high-frequency) pairs, which keep inv_freq, and 1 for slow ones
    scaled = inv_freq * (1 - ramp) + inv_freq / factor * ramp
    return scaled.to(device=device, dtype=dtype)


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(factor) + 1`` (1 when ``factor <= 1``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(factor: float, mscale: float = 1.0, mscale_all_dim: float = 0.0) -> float:
    """The multiplier for YaRN's cos and sin tables, as DeepSeek-V3 applies it:
    ``yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)``.

    With the defaults (1, 0) it is YaRN's ``0.1 * ln(factor) + 1``; with ``mscale ==
    mscale_all_dim`` (DeepSeek-V3's configs) it is 1 and the correction moves entirely into
    :func:`yarn_softmax_scale_factor`.
    """
    return yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)


def yarn_softmax_scale_factor(factor: float, mscale_all_dim: float = 0.0) -> float:
    """The factor multiplying the attention softmax scale under YaRN (DeepSeek-V3 MLA):
    ``yarn_get_mscale(factor, mscale_all_dim) ** 2`` (1 with ``mscale_all_dim=0``)."""
    return yarn_get_mscale(factor, mscale_all_dim) ** 2


def rope_cos_sin(
    inv_freq: torch.Tensor,
    positions: torch.Tensor,
    interleaved: bool = False,
    attention_factor: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[..., 2 * len(inv_freq)]`` for ``positions`` [...] (typically [S]).

    Angles ``positions[..., None] * inv_freq`` are computed in float32 (float64 when
    ``inv_freq`` is float64) on ``inv_freq``'s device, laid out as ``cat(freqs, freqs)``
    (rotate-half) or, with ``interleaved``, ``repeat_interleave(freqs, 2)``, multiplied by
    ``attention_factor`` (YaRN) and cast to ``dtype``. Insert head/batch dimensions yourself,
    e.g. ``cos[:, None, None, :]`` for [S, B, N, D] inputs.
    """
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1 or not inv_freq.is_floating_point():
        raise TypeError(f"rope_cos_sin: inv_freq must be a 1-D floating-point tensor, got {_describe(inv_freq)}")
    if not isinstance(positions, torch.Tensor) or positions.dtype == torch.bool or positions.is_complex():
        raise TypeError(f"rope_cos_sin: positions must be an integer or floating-point tensor, got {_describe(positions)}")
    work = torch.promote_types(inv_freq.dtype, torch.float32)
    freqs = positions.to(device=inv_freq.device, dtype=work).unsqueeze(-1) * inv_freq.to(work)
    angles = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are extended beyond the pretraining context.

    ``kind``: ``"none"`` (plain RoPE), ``"llama3"`` (uses ``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position_embeddings``) or ``"yarn"`` (uses ``factor``,
    ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, ``mscale``,
    ``mscale_all_dim``). ``factor`` is the context extension ratio (new length / original length).
    """

    kind: str = "none"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self) -> None:
        _check_scaling(self)


def _check_scaling(s: RopeScaling) -> None:
    def number(name: str, low: float, inclusive: bool = False) -> None:
        value = getattr(s, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < low or (value == low and not inclusive):
            raise ValueError(f"RopeScaling: {name}={value!r} must be a finite number {'>=' if inclusive else '>'} {low}")

    if s.kind not in SCALING_KINDS:
        raise ValueError(f"RopeScaling: kind={s.kind!r} must be one of {', '.join(map(repr, SCALING_KINDS))}")
    number("factor", 0.0)
    if s.kind == "none":
        if s.factor != 1.0:
            raise ValueError(f"RopeScaling: factor={s.factor!r} has no effect with kind='none'; use kind='llama3' or 'yarn'")
        return
    original = s.original_max_position_embeddings
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        raise ValueError(
            f"RopeScaling: original_max_position_embeddings={original!r} must be a positive int (the pretraining context) "
            f"for kind={s.kind!r}"
        )
    if s.kind == "llama3":
        number("low_freq_factor", 0.0)
        number("high_freq_factor", s.low_freq_factor)
    else:
        number("beta_slow", 0.0)
        number("beta_fast", s.beta_slow)
        number("mscale", 0.0, inclusive=True)
        number("mscale_all_dim", 0.0, inclusive=True)


def rope_frequencies(
    dim: int, base: float = 10000.0, scaling: RopeScaling | None = None, *, device=None
) -> tuple[torch.Tensor, float]:
    """``(inv_freq [dim // 2] float32, attention_factor)`` for ``scaling`` (None = plain RoPE).

    ``attention_factor`` multiplies cos/sin (pass it to :func:`rope_cos_sin`); it is 1 except for
    YaRN (:func:`yarn_attention_factor`). YaRN's softmax-scale correction is
    :func:`yarn_softmax_scale_factor`.
    """
    s = scaling or RopeScaling()
    if s.kind == "llama3":
        inv_freq = llama3_inv_freq(
            dim, base, s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings, device=device
        )
        return inv_freq, 1.0
    if s.kind == "yarn":
        inv_freq = yarn_inv_freq(
            dim, base, s.factor, s.original_max_position_embeddings, s.beta_fast, s.beta_slow, device=device
        )
        return inv_freq, yarn_attention_factor(s.factor, s.mscale, s.mscale_all_dim)
    return rope_inv_freq(dim, base, device=device), 1.0
