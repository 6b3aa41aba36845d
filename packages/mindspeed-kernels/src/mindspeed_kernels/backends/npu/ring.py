"""ring_attention_update -> ``torch_npu.npu_ring_attention_update(prev_attn_out, prev_softmax_max,
prev_softmax_sum, cur_attn_out, cur_softmax_max, cur_softmax_sum, *, actual_seq_qlen=None,
input_layout="SBH", input_softmax_layout="") -> (attn_out, softmax_max, softmax_sum)``.

The kernel merges (max, sum) softmax statistics, [B, N, S, 8] float32 with the value
replicated 8 times; an lse maps to ``max = lse, sum = 1`` and back as ``max + log(sum)``.

Layouts: the merge is independent per (token, head), so every layout is handed to the kernel
as SBH with B = 1 and the tokens flattened in memory order (a free view of ``out``; only the
small lse is permuted): SBH/BSH/BSND -> [S*B or B*S, 1, N*D]; BNSD -> [B*N*S, 1, D] with N = 1;
TND -> [T, 1, N*D]. This avoids the kernel's TND mode and its extra constraints.

The contract's edges are handled here: ``cur_out`` is cast to ``prev_out``'s dtype (the kernel
needs one dtype; the running result is typically float32), and rows where both lse are -inf
are fed finite stand-ins and then set to out 0, lse -inf. torch_npu registers no autograd
formula for the kernel, so the backward (elementwise, float32) is written here.

With a torch_npu release that lacks the kernel, or float64
inputs, the reference implementation runs instead.
"""

from __future__ import annotations

import torch

from mindspeed_kernels.backends.npu._common import KERNEL_DTYPES, reference_op


def _token_shape(out: torch.Tensor, layout: str, n: int) -> tuple[int, int, int]:
    """(T', N', D) with out viewed as [T', N', D] in memory order."""
    if layout == "BNSD":
        return out.shape[0] * out.shape[1] * out.shape[2], 1, out.shape[3]
    if layout == "TND":
        return tuple(out.shape)
    tokens = out.shape[0] * out.shape[1]
    return tokens, n, out.shape[-1] // n if layout in ("SBH", "BSH") else out.shape[3]


def _lse_to_tokens(lse: torch.Tensor, layout: str) -> torch.Tensor:
    """lse [B, N, S] (TND: [T, N]) -> [T', N'] in the token order of :func:`_token_shape`."""
    if layout == "TND":
        return lse
    if layout == "BNSD":
        return lse.reshape(-1, 1)
    order = (2, 0, 1) if layout == "SBH" else (0, 2, 1)  # SBH tokens are (s, b); BSH/BSND (b, s)
    return lse.permute(order).reshape(-1, lse.shape[1])


def _lse_from_tokens(lse: torch.Tensor, layout: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`_lse_to_tokens`; ``shape`` is the lse's shape in the layout."""
    if layout == "TND":
        return lse
    b, n, s = shape
    if layout == "BNSD":
        return lse.reshape(b, n, s)
    if layout == "SBH":
        return lse.reshape(s, b, n).permute(1, 2, 0).contiguous()
    return lse.reshape(b, s, n).permute(0, 2, 1).contiguous()


def _merge_on_kernel(prev3, prev_lse2, cur3, cur_lse2):
    """The kernel call on token views: out3 [T', N', D], lse2 [T', N'] -> (out3, lse2, dead)."""
    import torch_npu

    tokens, heads, dim = prev3.shape
    dead = torch.isneginf(prev_lse2) & torch.isneginf(cur_lse2)

    def stats(lse2):
        lse2 = lse2.float().masked_fill(dead, 0.0)  # finite stand-ins: -inf - -inf would be NaN
        mx = lse2.t().reshape(1, heads, tokens, 1).expand(1, heads, tokens, 8).contiguous()
        return mx, torch.ones_like(mx)

    (p_max, p_sum), (c_max, c_sum) = stats(prev_lse2), stats(cur_lse2)
    out, mx, sm = torch_npu.npu_ring_attention_update(
        prev3.reshape(tokens, 1, heads * dim), p_max, p_sum,
        cur3.to(prev3.dtype).reshape(tokens, 1, heads * dim), c_max, c_sum,
    )
    lse2 = (mx[0, :, :, 0] + sm[0, :, :, 0].log()).t().masked_fill(dead, float("-inf"))
    out3 = out.reshape(tokens, heads, dim).masked_fill(dead.unsqueeze(-1), 0.0)
    return out3, lse2, dead


class _RingUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prev_out, prev_lse, cur_out, cur_lse, layout):
        shape = _token_shape(prev_out, layout, prev_lse.shape[1])
        prev3, cur3 = prev_out.reshape(shape), cur_out.reshape(shape)
        p2, c2 = _lse_to_tokens(prev_lse, layout), _lse_to_tokens(cur_lse, layout)
        out3, lse2, _ = _merge_on_kernel(prev3, p2, cur3, c2)
        ctx.save_for_backward(prev3, cur3, p2, c2, lse2)
        ctx.meta = (layout, prev_out.shape, tuple(prev_lse.shape), cur_out.dtype)
        return out3.reshape(prev_out.shape), _lse_from_tokens(lse2, layout, tuple(prev_lse.shape))

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        prev3, cur3, p2, c2, lse2 = ctx.saved_tensors
        layout, out_shape, lse_shape, cur_dtype = ctx.meta
        finite = torch.isfinite(lse2)
        safe = lse2.masked_fill(~finite, 0.0)
        w_prev = (p2.float() - safe).exp().masked_fill(~finite, 0.0)
        w_cur = (c2.float() - safe).exp().masked_fill(~finite, 0.0)
        prev32, cur32 = prev3.float(), cur3.float()
        g3 = torch.zeros_like(prev32) if grad_out is None else grad_out.reshape(prev3.shape).float()
        out32 = prev32 * w_prev.unsqueeze(-1) + cur32 * w_cur.unsqueeze(-1)
        g_lse = 0.0 if grad_lse is None else _lse_to_tokens(grad_lse, layout).float()
        # d out / d lse_x = w_x (x - out); d lse / d lse_x = w_x
        d_plse = w_prev * ((g3 * (prev32 - out32)).sum(-1) + g_lse)
        d_clse = w_cur * ((g3 * (cur32 - out32)).sum(-1) + g_lse)
        d_prev = (g3 * w_prev.unsqueeze(-1)).to(prev3.dtype).reshape(out_shape)
        d_cur = (g3 * w_cur.unsqueeze(-1)).to(cur_dtype).reshape(out_shape)
        d_plse = _lse_from_tokens(d_plse, layout, lse_shape).to(p2.dtype)
        d_clse = _lse_from_tokens(d_clse, layout, lse_shape).to(c2.dtype)
        return d_prev, d_plse, d_cur, d_clse, None


def ring_attention_update(prev_out, prev_lse, cur_out, cur_lse, layout="SBH"):
    """See :func:`mindspeed_kernels.ops.ring_attention_update` and this module's docstring."""
    import torch_npu

    if not hasattr(torch_npu, "npu_ring_attention_update") or prev_out.dtype not in KERNEL_DTYPES:
        return reference_op("ring_attention_update")(prev_out, prev_lse, cur_out, cur_lse, layout)
    return _RingUpdate.apply(prev_out, prev_lse, cur_out, cur_lse, layout)
