"""Dense ``x @ weight^T (+ bias)``: oneDNN's float32 GEMM on CPU where torch ships it, torch's elsewhere.

torch's CPU ``mm``/``linear`` run float32 through MKL's sgemm. The same torch builds carry oneDNN,
whose float32 inner product (``torch.ops.mkldnn._linear_pointwise``, what inductor emits for CPU
linears) is full float32 arithmetic (no bf16/tf32 down-conversion) and, on the AMD EPYC CPU this
project develops on, 10-20% faster for training-size GEMMs (up to 2x for a few rows against a
large weight); below ``ONEDNN_MIN_MACS`` multiply-adds its per-call overhead (~15 us) costs more
than it saves. Results differ from MKL's in rounding only (another summation order).

``MINDSPEED_CPU_GEMM=torch`` keeps torch's own GEMM everywhere (``onednn``, the default, uses
oneDNN where it is usable). Usable means: torch reports oneDNN available, the op exists, and a
probe on first use reproduces ``mm`` on small cases (a column-major input, a transposed weight view);
otherwise torch's GEMM runs (with one warning on the ``mindspeed_kernels`` logger when the op is there
but fails).
"""

from __future__ import annotations

import logging
import os

import torch
from torch.autograd.function import once_differentiable

ENV_VAR = "MINDSPEED_CPU_GEMM"
CHOICES = ("onednn", "torch")
ONEDNN_MIN_MACS = 1 << 22
LOG = logging.getLogger("mindspeed_kernels")

_resolved: dict[str, object] = {}  # env value -> the oneDNN op, or None for torch's GEMM


def cpu_gemm_choice() -> str:
    """The validated value of ``MINDSPEED_CPU_GEMM`` (default ``onednn``)."""
    value = os.environ.get(ENV_VAR) or "onednn"
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not a CPU GEMM choice; set it to one of {', '.join(CHOICES)}")
    return value


def _probe():
    """The oneDNN linear op when it runs here and matches ``mm``; else None (with the reason logged)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise.default
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(9, 17, generator=gen), torch.randn(13, 17, generator=gen)
        # contiguous operands, a column-major x, and a weight that is the transpose of a [K, N] tensor
        cases = ((a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t()))
        ok = all(torch.allclose(op(x, w, None, "none", [], ""), x @ w.t(), rtol=1e-5, atol=1e-5) for x, w in cases)
    except (AttributeError, RuntimeError) as exc:
        LOG.warning("oneDNN linear unusable (%s); CPU float32 GEMMs use torch's", exc)
        return None
    if not ok:
        LOG.warning("oneDNN linear disagrees with torch.mm on a probe; CPU float32 GEMMs use torch's")
        return None
    return op


def cpu_gemm() -> str:
    """The GEMM CPU float32 ``linear`` calls above the threshold run here: ``"onednn"`` or ``"torch"``."""
    return "onednn" if _onednn_op() is not None else "torch"


def _onednn_op():
    choice = cpu_gemm_choice()
    if choice not in _resolved:
        _resolved[choice] = _probe() if choice == "onednn" else None
    return _resolved[choice]


def _use_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The oneDNN op when this call is a CPU float32 GEMM large enough to gain from it, else None."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return None
    if bias is not None and bias.dtype != torch.float32:
        return None
    if x.numel() * weight.shape[0] < ONEDNN_MIN_MACS:
        return None
    return _onednn_op()


def gemm_nt(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T (+ bias)`` without autograd: x [..., K] (any strides), weight [N, K] (any strides,
    e.g. ``w.t()`` for ``x @ w``) -> [..., N], a new contiguous tensor."""
    op = _use_onednn(x, weight, bias)
    if op is None:
        return torch.nn.functional.linear(x, weight, bias)
    out = op(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    # not .view: an autograd Function may return this, and a view output cannot be modified in place
    return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], weight.shape[0]))


class _Linear(torch.autograd.Function):
    """Forward and input gradient through :func:`gemm_nt`; the weight gradient ``g^T x`` through torch
    (oneDNN's inner product is no faster in that orientation)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return gemm_nt(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        dx = gemm_nt(grad, weight.t()) if ctx.needs_input_grad[0] else None
        dw = torch.mm(g2.t(), x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x, weight, bias=None):
    """See :func:`mindspeed_kernels.ops.linear`."""
    grads = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and grads:
        return _Linear.apply(x, weight, bias)
    return gemm_nt(x, weight, bias)
