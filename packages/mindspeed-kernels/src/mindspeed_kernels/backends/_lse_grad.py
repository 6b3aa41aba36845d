"""Gradient through a fused kernel's log-sum-exp, for kernels that return lse but do not
differentiate it (torch_npu's fusion attention, torch's flash op).

Ring attention merges partial results with their lse, so the lse must carry gradient. With
``s = scale * q k^T + bias`` and ``lse_i = log sum_j exp(s_ij)``, ``d lse_i / d s_ij = p_ij``:
``dq_i = scale * g_i * (P k)_i`` and ``dk = scale * P^T (g q)``. Both come from one more run of
the kernel with ``value = k`` (its output is ``P k``; autograd through it w.r.t. value gives
``P^T`` applied to a chosen output gradient), so masks, bias and GQA need no special case.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mindspeed_kernels._layouts import heads, lse_like_heads


class DifferentiableLse(torch.autograd.Function):
    """``apply(q, k, lse, rerun, layout, n_q, scale)`` -> lse, now differentiable in q and k.

    ``rerun(q, k, value)`` must run the same attention (same mask, bias, no dropout) and return
    ``P value`` in q's layout; lse is [B, N, S] (TND [T, N]); rows with lse -inf get no gradient.
    """

    @staticmethod
    def forward(ctx, q, k, lse, rerun: Callable, layout: str, n_q: int, scale: float):
        ctx.save_for_backward(q, k, lse)
        ctx.args = (rerun, layout, n_q, scale)
        return lse.clone()

    @staticmethod
    def backward(ctx, g):
        q, k, lse = ctx.saved_tensors
        rerun, layout, n_q, scale = ctx.args
        g = lse_like_heads(g.float().masked_fill(~torch.isfinite(lse), 0.0), layout)
        q = q.detach()
        with torch.enable_grad():
            value = k.detach().requires_grad_()
            pk = rerun(q, k.detach(), value)  # P k, in q's layout
            dy = (heads(q, layout, n_q).float() * g).reshape(q.shape).to(q.dtype)
            (pt_gq,) = torch.autograd.grad(pk, value, dy)  # P^T (g q), summed over each kv group
        dq = (heads(pk.detach(), layout, n_q).float() * g * scale).reshape(q.shape).to(q.dtype)
        return dq, (pt_gq.float() * scale).to(k.dtype), None, None, None, None, None
