"""Reference ring-attention merge: plain torch ops in float32 (float64 for float64 inputs), so
autograd differentiates it."""

from __future__ import annotations

import torch

from mindspeed_kernels._layouts import heads, lse_like_heads


def ring_attention_update(prev_out, prev_lse, cur_out, cur_lse, layout="SBH"):
    """Reference implementation of :func:`mindspeed_kernels.ops.ring_attention_update` (validated there)."""
    n = prev_lse.shape[1]
    # float32 math; float64 when any input is float64 (gradcheck, exact references)
    compute = torch.float64 if torch.float64 in {t.dtype for t in (prev_out, prev_lse, cur_out, cur_lse)} else torch.float32
    a, b = prev_lse.to(compute), cur_lse.to(compute)
    neg_inf = torch.tensor(float("-inf"), device=a.device)
    # rows with no key on either side: compute with finite stand-ins so neither the values nor
    # the gradients of the unused branch of torch.where hold -inf - -inf = NaN
    dead = (a == neg_inf) & (b == neg_inf)
    a_s, b_s = a.masked_fill(dead, 0.0), b.masked_fill(dead, 0.0)
    lse_s = torch.logaddexp(a_s, b_s)
    w_prev = lse_like_heads((a_s - lse_s).exp().masked_fill(dead, 0.0), layout)
    w_cur = lse_like_heads((b_s - lse_s).exp().masked_fill(dead, 0.0), layout)
    out = heads(prev_out.to(compute), layout, n) * w_prev + heads(cur_out.to(compute), layout, n) * w_cur
    out = out.reshape(prev_out.shape)
    return out.to(prev_out.dtype), torch.where(dead, neg_inf, lse_s)
