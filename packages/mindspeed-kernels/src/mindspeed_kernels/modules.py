"""Thin ``nn.Module`` wrappers around the functional ops, for models built from layers.

Each module owns its parameters and calls the op in :mod:`mindspeed_kernels.ops` in ``forward``;
the backend is picked per call as for the functional ops (``backend`` overrides it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mindspeed_kernels.ops import grouped_matmul, rms_norm
from mindspeed_kernels.rope import RopeScaling, rope_cos_sin, rope_frequencies


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension (:func:`mindspeed_kernels.ops.rms_norm`).

    ``weight`` [hidden_size] starts at ones, or at zeros with ``add_rmsnorm_offset`` (the layer
    then scales by ``1 + weight``, Gemma / Qwen3-Next style), so a fresh layer scales by 1.
    ``forward(x)``: x [..., hidden_size] -> same shape and dtype.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        add_rmsnorm_offset: bool = False,
        compute_in_fp32: bool = True,
        *,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"RMSNorm: hidden_size={hidden_size!r} must be a positive int")
        self.hidden_size, self.eps = hidden_size, eps
        self.add_rmsnorm_offset, self.compute_in_fp32, self.backend = add_rmsnorm_offset, compute_in_fp32, backend
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(0.0 if self.add_rmsnorm_offset else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(
            x,
            self.weight,
            self.eps,
            add_rmsnorm_offset=self.add_rmsnorm_offset,
            compute_in_fp32=self.compute_in_fp32,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, add_rmsnorm_offset={self.add_rmsnorm_offset}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables for :func:`mindspeed_kernels.ops.rotary_pos_emb`.

    ``dim`` is the rotary dimension R (even; ``head_dim * rotary_percent`` for partial rotary),
    ``base`` the RoPE theta, ``scaling`` a :class:`~mindspeed_kernels.rope.RopeScaling` (None =
    plain RoPE), ``interleaved`` the cos/sin layout. ``forward(positions, dtype=float32)``:
    positions [...] (integer or float) -> ``(cos, sin)``, each [..., dim] in ``dtype`` on the
    module's device, already multiplied by ``attention_factor`` (YaRN; 1 otherwise).
    ``inv_freq`` is a non-persistent float32 buffer, rebuilt (not converted) whenever the module
    is moved or cast, so ``module.to(bfloat16)`` and ``to_empty()`` leave it exact.
    """

    def __init__(
        self,
        dim: int,
        base: float = 10000.0,
        scaling: RopeScaling | None = None,
        interleaved: bool = False,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if scaling is not None and not isinstance(scaling, RopeScaling):
            raise TypeError(f"RotaryEmbedding: scaling must be a RopeScaling or None, got {type(scaling).__name__}")
        self.dim, self.base, self.scaling, self.interleaved = dim, base, scaling, interleaved
        inv_freq, self.attention_factor = rope_frequencies(dim, base, scaling, device=device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        # Rebuild rather than convert: Module.half()/to(bfloat16) would round the frequencies (and
        # shift every angle), and to_empty() after meta-device init would leave garbage, since a
        # non-persistent buffer is never reloaded from a checkpoint.
        self.inv_freq = rope_frequencies(self.dim, self.base, self.scaling, device=self.inv_freq.device)[0]
        return result

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(self.inv_freq, positions, self.interleaved, self.attention_factor, dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, scaling={self.scaling}, interleaved={self.interleaved}"


class GroupedLinear(nn.Module):
    """One linear layer per group (MoE experts) over group-sorted rows (:func:`grouped_matmul`).

    ``weight`` [num_groups, in_features, out_features] (note: input-major, unlike ``nn.Linear``),
    ``bias`` [num_groups, out_features] or None; both start uniform in ``±1/sqrt(in_features)``
    as ``nn.Linear`` does. ``forward(x, group_list, group_list_type=0)``: x [M, in_features] with
    rows sorted by group, ``group_list`` as in :func:`mindspeed_kernels.ops.grouped_matmul`
    -> [M, out_features] (rows past the last group are 0).
    """

    def __init__(
        self,
        num_groups: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_groups", num_groups), ("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GroupedLinear: {name}={value!r} must be a positive int")
        self.num_groups, self.in_features, self.out_features, self.backend = num_groups, in_features, out_features, backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_groups, in_features, out_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_groups, out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor, group_list: torch.Tensor | list[int], group_list_type: int = 0) -> torch.Tensor:
        return grouped_matmul(x, self.weight, group_list, group_list_type=group_list_type, bias=self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        sizes = f"num_groups={self.num_groups}, in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, bias={self.bias is not None}"
