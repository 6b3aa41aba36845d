"""A CPU stand-in for ``torch_npu``: the kernels the npu backend calls, with their documented
parameter names and defaults (a misspelt keyword raises TypeError), their documented
constraints (a violation raises RuntimeError, as torch_npu's TORCH_CHECKs do) and their
documented formulas, computed naively in float32. Autograd matches torch_npu's registration:
kernels torch_npu differentiates are written in differentiable torch ops, the others
(npu_grouped_matmul, npu_ring_attention_update) run under no_grad, and the softmax statistics
of npu_fusion_attention carry no gradient.

Modelled assumptions (undocumented behaviour): fully masked attention rows fill scores with the
float32 minimum, so softmax_max is that minimum; with ``inner_precise=2`` they output 0 and
softmax_sum 0, otherwise the uniform average of the values. A sort by expert id is stable.

Use :func:`make_module` and put the result in ``sys.modules["torch_npu"]``; every call is
appended to ``module.calls`` as ``(name, bound arguments)``.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
import torch.nn.functional as F

NO_LIMIT = 2147483647
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
FLOAT_MIN = torch.finfo(torch.float32).min


def check(cond: bool, message: str) -> None:
    if not cond:
        raise RuntimeError(message)


# ----------------------------------------------------------------------------- elementwise kernels


def npu_rms_norm(self, gamma, epsilon=1e-06):
    pairs = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
             (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)}
    check(2 <= self.dim() <= 8, f"self must have 2-8 dims, got {self.dim()}")
    check(1 <= gamma.dim() < self.dim() and tuple(gamma.shape) == tuple(self.shape[-gamma.dim():]),
          f"gamma shape {tuple(gamma.shape)} must equal self's trailing dims {tuple(self.shape)}")
    check((self.dtype, gamma.dtype) in pairs, f"unsupported dtype pair self={self.dtype} gamma={gamma.dtype}")
    dims = tuple(range(-gamma.dim(), 0))
    x = self.float()
    rstd = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + epsilon)
    return (x * rstd * gamma.float()).to(self.dtype), rstd.detach()


def _halves(x, dim):
    check(x.dtype in KERNEL_DTYPES, f"dtype {x.dtype} not supported")
    check(x.shape[dim] % 2 == 0, f"size {x.shape[dim]} along dim {dim} must be even")
    a, b = x.float().chunk(2, dim)
    return a, b


def npu_swiglu(input, dim=-1):
    check(1 <= input.dim() <= 8, "input must have 1-8 dims")
    check(input.is_contiguous(), "npu_swiglu does not support non-contiguous input")
    a, b = _halves(input, dim)
    return (F.silu(a) * b).to(input.dtype)


def npu_geglu(input, dim=-1, approximate=1, activate_left=False):
    check(approximate in (0, 1), f"approximate must be 0 (none) or 1 (tanh), got {approximate!r}")
    check(isinstance(activate_left, bool), "activate_left must be a bool")
    a, b = _halves(input, dim)
    gate, up = (a, b) if activate_left else (b, a)
    gelu = F.gelu(gate, approximate="tanh" if approximate == 1 else "none")
    return (gelu * up).to(input.dtype), gelu.to(input.dtype).detach()


ROTARY_PATTERNS = {  # which of the 3 leading dims r1 matches (1) or broadcasts over (0)
    "half": {(0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 0), (1, 1, 0), (1, 0, 0)},
    "interleave": {(0, 0, 1), (0, 1, 0), (1, 0, 0)},
}


def npu_rotary_mul(input, r1, r2, rotary_mode="half", rotate=None):
    check(rotary_mode in ROTARY_PATTERNS, f"rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    check(rotate is None, "the fake does not model rotate")
    check(input.dim() == 4 and r1.dim() == 4, f"input and r1 must be 4-d, got {input.dim()} and {r1.dim()}")
    check(r1.shape == r2.shape, "r1 and r2 must have one shape")
    check(input.dtype in KERNEL_DTYPES and r1.dtype == input.dtype == r2.dtype, "input, r1, r2 need one kernel dtype")
    check(input.shape[-1] % 2 == 0 and r1.shape[-1] == input.shape[-1], "D must be even and r1 must span D")
    lead, r_lead = input.shape[:3], r1.shape[:3]
    fits = any(all(r == (x if p else 1) for r, x, p in zip(r_lead, lead, pat, strict=True))
               for pat in ROTARY_PATTERNS[rotary_mode])
    check(fits, f"r1 shape {tuple(r1.shape)} is no documented {rotary_mode} pattern for input {tuple(input.shape)}")
    x = input.float()
    if rotary_mode == "half":
        x1, x2 = x.chunk(2, -1)
        turned = torch.cat((-x2, x1), -1)
    else:
        turned = torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)
    return (x * r1.float() + turned * r2.float()).to(input.dtype)


# ----------------------------------------------------------------------------- fusion attention


def _to_bnsd(x, layout, n):
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    x = x.unflatten(-1, (n, -1))
    return x.permute(1, 2, 0, 3) if layout == "SBH" else x.transpose(1, 2)


def _from_bnsd(x, layout):
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    x = x.permute(2, 0, 1, 3) if layout == "SBH" else x.transpose(1, 2)
    return x.flatten(-2)


def _check_mask(mask, mode, shape_ok, pre, nxt, band_of):
    if mode >= 2:
        check(mask is not None and mask.dtype == torch.bool and tuple(mask.shape) == (2048, 2048),
              f"sparse_mode={mode} needs the compressed 2048x2048 bool mask")
        check(torch.equal(mask, torch.ones(2048, 2048, dtype=torch.bool).triu(1)), "compressed mask must be triu(1)")
        return
    if mode == 1:
        check(mask is not None, "sparse_mode=1 needs atten_mask")
    if mask is None:
        return
    check(mask.dtype in (torch.bool, torch.uint8), f"atten_mask dtype {mask.dtype}")
    check(shape_ok(tuple(mask.shape)), f"atten_mask shape {tuple(mask.shape)} is not documented for this call")
    if mode == 0 and (pre != NO_LIMIT or nxt != NO_LIMIT):
        check(bool((mask.bool() | band_of(mask.shape[-2], mask.shape[-1])).eq(mask.bool()).all()),
              "atten_mask disagrees with pre_tockens/next_tockens")


def _rule(mode, s_q, s_kv, pre, nxt):
    """Masked positions of the built-in modes (None: no rule)."""
    i, j = torch.arange(s_q)[:, None], torch.arange(s_kv)[None, :]
    delta = s_kv - s_q
    if mode == 0 and (pre != NO_LIMIT or nxt != NO_LIMIT):
        return (j - i < -pre) | (j - i > nxt)
    if mode == 2:
        return j > i
    if mode == 3:
        return j > i + delta
    if mode == 4:
        return (j - i - delta < -pre) | (j - i - delta > nxt)
    return None


def _expand_pse(pse, s_q, s_kv):
    """pse rows for every query row, undoing the documented alibi compression (last 1024 rows)."""
    if pse.shape[2] == s_q:
        return pse.float()
    last = pse[..., -1, :].float()
    rows, cols = torch.arange(s_q)[:, None], torch.arange(s_kv)[None, :]
    src = (cols + (s_q - 1 - rows)).clamp(max=s_kv - 1)  # row i is the last row shifted by s_q-1-i
    full = last[..., src]
    tail = s_q - pse.shape[2]
    return torch.cat((full[..., :tail, :], pse.float()), dim=2)


def _attend(q, k, v, scale, keep_prob, masked, pse, inner_precise):
    """One [b, N, sq, D] problem -> out (float32), max, sum ([b, N, sq])."""
    groups = q.shape[1] // k.shape[1]
    kr, vr = k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1)
    raw = q.float() @ kr.transpose(-1, -2)
    scores = scale * (raw + pse) if pse is not None else scale * raw
    if masked is None:
        masked = torch.zeros(scores.shape[-2:], dtype=torch.bool)
    masked = masked.expand_as(scores)
    empty = masked.all(-1)
    filled = scores.masked_fill(masked, FLOAT_MIN)
    mx = filled.amax(-1)
    sm = (filled - mx.unsqueeze(-1)).exp().sum(-1)
    probs = torch.softmax(filled, -1)
    if inner_precise == 2:
        probs = probs.masked_fill(empty.unsqueeze(-1), 0.0)
        sm = sm.masked_fill(empty, 0.0)
    if keep_prob < 1.0:
        probs = probs * torch.bernoulli(torch.full_like(probs, keep_prob)) / keep_prob
    return probs @ vr, mx, sm


def _fa_checks(query, key, value, head_num, input_layout, keep_prob, inner_precise, padding_mask, prefix):
    check(input_layout in LAYOUTS, f"input_layout {input_layout!r} must be one of {LAYOUTS}")
    rank = 4 if input_layout in ("BSND", "BNSD") else 3
    check(query.dim() == key.dim() == value.dim() == rank, f"{input_layout} needs {rank}-d query/key/value")
    check(query.dtype in KERNEL_DTYPES and key.dtype == value.dtype == query.dtype, "query/key/value need one kernel dtype")
    check(0.0 < keep_prob <= 1.0, f"keep_prob must be in (0, 1], got {keep_prob}")
    check(inner_precise in (0, 1, 2), f"inner_precise {inner_precise}")
    check(padding_mask is None and prefix is None, "padding_mask / prefix are not modelled")
    if input_layout in ("SBH", "BSH"):
        check(query.shape[-1] % head_num == 0, f"head_num {head_num} does not divide H {query.shape[-1]}")
        d = query.shape[-1] // head_num
        check(key.shape[-1] % d == 0, f"key's H {key.shape[-1]} is not a multiple of D {d}")
        n_kv, d_k = key.shape[-1] // d, d
        d_v = value.shape[-1] // n_kv
    else:
        axis = 2 if input_layout == "BSND" else 1
        check(query.shape[axis] == head_num, f"head_num {head_num} != query heads {query.shape[axis]}")
        d, d_k, n_kv, d_v = query.shape[-1], key.shape[-1], key.shape[axis], value.shape[-1]
    check(n_kv >= 1 and head_num % n_kv == 0, f"Nq {head_num} must be a multiple of Nkv {n_kv}")
    check(d_k == d and d_v <= d, f"need Dq == Dk >= Dv, got {d}, {d_k}, {d_v}")
    return n_kv


def _fa_varlen(query, key, value, head_num, atten_mask, scale, keep_prob, pre, nxt, inner_precise, q_ends, kv_ends, mode):
    check(isinstance(q_ends, list) and isinstance(kv_ends, list) and len(q_ends) == len(kv_ends) > 0,
          "TND needs actual_seq_qlen and actual_seq_kvlen as int lists of one length")
    check(q_ends[-1] == query.shape[0] and kv_ends[-1] == key.shape[0], "the last cumulative lengths must equal T")
    q_starts, kv_starts = [0, *q_ends[:-1]], [0, *kv_ends[:-1]]
    lens = [(qe - qs, ke - ks) for qs, qe, ks, ke in zip(q_starts, q_ends, kv_starts, kv_ends, strict=True)]
    max_q, max_kv = max(a for a, _ in lens), max(b for _, b in lens)
    _check_mask(atten_mask, mode, lambda s: s == (max_q, max_kv), pre, nxt, lambda a, b: _rule(0, a, b, pre, nxt))
    outs, maxes, sums = [], [], []
    for (qs, ks), (s_q, s_kv) in zip(zip(q_starts, kv_starts, strict=True), lens, strict=True):
        q4, k4, v4 = (t[start:start + n].transpose(0, 1)[None] for t, start, n in
                      ((query, qs, s_q), (key, ks, s_kv), (value, ks, s_kv)))
        masked = _rule(mode, s_q, s_kv, pre, nxt) if mode or atten_mask is not None else None
        if mode <= 1 and atten_mask is not None:
            user = atten_mask[:s_q, :s_kv].bool()
            masked = user if masked is None else user | masked
        o, mx, sm = _attend(q4, k4, v4, scale, keep_prob, masked, None, inner_precise)
        outs.append(o[0].transpose(0, 1))
        maxes.append(mx[0])
        sums.append(sm[0])
    out = torch.cat(outs, 0).to(query.dtype)
    n_major = lambda parts: torch.cat(parts, 1).unsqueeze(-1).expand(-1, -1, 8).contiguous()  # [N, T, 8]
    t = query.shape[0]
    return out, n_major(maxes).view(t, head_num, 8), n_major(sums).view(t, head_num, 8)


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                         prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False):
    n_kv = _fa_checks(query, key, value, head_num, input_layout, keep_prob, inner_precise, padding_mask, prefix)
    check(sparse_mode in (0, 1, 2, 3, 4), f"sparse_mode {sparse_mode} is not modelled")
    extras = (torch.empty(0, dtype=query.dtype), 0, 0, 0)
    if input_layout == "TND":
        check(pse is None, "the fake does not model varlen pse")
        out, mx, sm = _fa_varlen(query, key, value, head_num, atten_mask, scale, keep_prob, pre_tockens, next_tockens,
                                 inner_precise, actual_seq_qlen, actual_seq_kvlen, sparse_mode)
        return (out, mx.detach(), sm.detach(), *extras)
    check(actual_seq_qlen is None and actual_seq_kvlen is None, "actual_seq_* are for TND only")
    q4 = _to_bnsd(query, input_layout, head_num)
    k4, v4 = _to_bnsd(key, input_layout, n_kv), _to_bnsd(value, input_layout, n_kv)
    b, n, s_q, s_kv = q4.shape[0], q4.shape[1], q4.shape[2], k4.shape[2]
    documented = {(b, n, s_q, s_kv), (b, 1, s_q, s_kv), (1, 1, s_q, s_kv), (s_q, s_kv)}
    _check_mask(atten_mask, sparse_mode, documented.__contains__, pre_tockens, next_tockens,
                lambda a, c: _rule(0, a, c, pre_tockens, next_tockens))
    if pse is not None:
        compressed = s_q == s_kv > 1024 and sparse_mode in (0, 2, 3) and pse.shape[2] == 1024
        check(pse.dtype == query.dtype, "pse must have query's dtype")
        check(pse.dim() == 4 and pse.shape[0] in (1, b) and pse.shape[1] == n and pse.shape[3] == s_kv
              and (pse.shape[2] == s_q or compressed), f"pse shape {tuple(pse.shape)} is not documented")
        pse = _expand_pse(pse, s_q, s_kv)
    # mode 0 without a mask ignores pre/next (documented: no mask means full computation)
    masked = _rule(sparse_mode, s_q, s_kv, pre_tockens, next_tockens) if sparse_mode or atten_mask is not None else None
    if sparse_mode <= 1 and atten_mask is not None:
        masked = atten_mask.bool() if masked is None else atten_mask.bool() | masked
    out, mx, sm = _attend(q4, k4, v4, scale, keep_prob, masked, pse, inner_precise)
    stats = lambda s: s.unsqueeze(-1).expand(*s.shape, 8).contiguous().detach()
    return (_from_bnsd(out, input_layout).to(query.dtype), stats(mx), stats(sm), *extras)


# ----------------------------------------------------------------------------- ring update, MoE, GMM


def npu_ring_attention_update(prev_attn_out, prev_softmax_max, prev_softmax_sum, cur_attn_out, cur_softmax_max,
                              cur_softmax_sum, *, actual_seq_qlen=None, input_layout="SBH", input_softmax_layout=""):
    check(input_layout == "SBH" and actual_seq_qlen is None and input_softmax_layout == "", "the fake models SBH only")
    check(prev_attn_out.shape == cur_attn_out.shape and prev_attn_out.dtype == cur_attn_out.dtype,
          "prev/cur attn_out need one shape and dtype")
    check(prev_attn_out.dtype in KERNEL_DTYPES and prev_attn_out.dim() == 3, "attn_out must be [S, B, H] in a kernel dtype")
    stats = (prev_softmax_max, prev_softmax_sum, cur_softmax_max, cur_softmax_sum)
    s, b, h = prev_attn_out.shape
    for t in stats:
        check(t.dtype == torch.float32 and t.dim() == 4 and t.shape[0] == b and t.shape[2] == s and t.shape[3] == 8,
              f"softmax stats must be float32 [B, N, S, 8], got {t.dtype} {tuple(t.shape)}")
        check(t.shape == prev_softmax_max.shape and bool((t == t[..., :1]).all()), "the 8 replicas must agree")
    n = prev_softmax_max.shape[1]
    check(h % n == 0, f"H {h} must be a multiple of N {n}")
    with torch.no_grad():
        pm, ps, cm, cs = (t[..., 0] for t in stats)
        mx = torch.maximum(pm, cm)
        p_scaled, c_scaled = ps * (pm - mx).exp(), cs * (cm - mx).exp()
        sm = p_scaled + c_scaled
        weight = lambda w: (w / sm).permute(2, 0, 1).unsqueeze(-1)  # [S, B, N, 1]
        heads = lambda x: x.float().unflatten(-1, (n, -1))
        out = heads(prev_attn_out) * weight(p_scaled) + heads(cur_attn_out) * weight(c_scaled)
        rep = lambda x: x.unsqueeze(-1).expand(*x.shape, 8).contiguous()
        return out.flatten(-2).to(prev_attn_out.dtype), rep(mx), rep(sm)


def npu_moe_token_permute(tokens, indices, num_out_tokens=None, padded_mode=False):
    check(tokens.dtype == torch.bfloat16 and tokens.dim() == 2, "tokens must be bfloat16 [T, H]")
    check(indices.dtype == torch.int64 and indices.dim() == 2 and indices.shape[0] == tokens.shape[0],
          "indices must be int64 [T, topK]")
    check(indices.shape[1] <= 512 and not padded_mode, "topK <= 512 and padded_mode=False only")
    top_k, flat = indices.shape[1], indices.reshape(-1)
    first = torch.sort(flat, stable=True).indices
    n = num_out_tokens or 0
    keep = min(n, flat.numel()) if n > 0 else n + flat.numel()
    return tokens.index_select(0, first[:keep] // top_k), torch.argsort(first).to(torch.int32)


def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    check(permuted_tokens.dtype == torch.bfloat16 and permuted_tokens.dim() == 2, "permuted_tokens must be bf16 2-d")
    check(sorted_indices.dtype == torch.int32 and sorted_indices.dim() == 1, "sorted_indices must be int32 1-d")
    check(not padded_mode and restore_shape is None, "padded_mode=False only")
    top_k = 1
    if probs is not None:
        check(probs.dtype == torch.bfloat16 and probs.dim() == 2 and probs.numel() == sorted_indices.numel(),
              "probs must be bfloat16 [T, topK]")
        top_k = probs.shape[1]
    rows = sorted_indices.long()
    kept = rows < permuted_tokens.shape[0]  # dropped slots point past the permuted rows
    picked = permuted_tokens.index_select(0, rows.clamp(max=permuted_tokens.shape[0] - 1)).float()
    picked = picked * kept.unsqueeze(-1)
    if probs is not None:
        picked = picked * probs.reshape(-1, 1).float()
    return picked.reshape(-1, top_k, picked.shape[-1]).sum(1).to(permuted_tokens.dtype)


def _group_ends(group_list, group_list_type):
    values = group_list.tolist()
    if group_list_type == 1:
        return [sum(values[: i + 1]) for i in range(len(values))]
    return values


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       output_dtype=None, tuning_config=None):
    quant = (bias, scale, offset, antiquant_scale, antiquant_offset, per_token_scale, activation_input,
             activation_quant_scale, activation_quant_offset, output_dtype, tuning_config)
    check(all(a is None for a in quant) and act_type == 0, "the fake models the plain float case only")
    check(isinstance(x, list) and isinstance(weight, list) and len(x) == len(weight) == 1, "x/weight: one-tensor lists")
    check(split_item in (2, 3) and group_list_type in (0, 1), "single-output modes with group_list_type 0/1 only")
    check(isinstance(group_list, torch.Tensor) and group_list.dtype == torch.int64 and group_list.dim() == 1,
          "group_list must be an int64 1-d tensor")
    a, w = x[0], weight[0]
    check(a.dtype in KERNEL_DTYPES and w.dtype == a.dtype and a.dim() == 2, "x [*, *] and weight in one kernel dtype")
    ends = _group_ends(group_list, group_list_type)
    starts = [0, *ends[:-1]]
    with torch.no_grad():
        if group_type == 0:
            check(a.is_contiguous(), "x must not be transposed")
            check(w.dim() == 3 and w.shape[0] == len(ends) and w.shape[1] == a.shape[1], "weight must be [E, K, N]")
            check(w.is_contiguous() or w.transpose(1, 2).is_contiguous(), "weight: contiguous or transposed only")
            check(ends[-1] == a.shape[0], f"groups must cover x exactly: end {ends[-1]} vs M {a.shape[0]}")
            out = torch.cat([a[s:e].float() @ w[g].float() for g, (s, e) in enumerate(zip(starts, ends, strict=True))])
            return [out.to(a.dtype)]
        check(group_type == 2, f"group_type {group_type} is not modelled")
        check(a.t().is_contiguous() and w.dim() == 2 and w.is_contiguous(), "K-grouping: x.t() view and a 2-d weight")
        check(ends[-1] == a.shape[1] == w.shape[0], "groups must cover the grouped axis exactly")
        out = torch.stack([a[:, s:e].float() @ w[s:e].float() for s, e in zip(starts, ends, strict=True)])
        return [out.to(a.dtype)]


KERNELS = (npu_rms_norm, npu_swiglu, npu_geglu, npu_rotary_mul, npu_fusion_attention, npu_ring_attention_update,
           npu_moe_token_permute, npu_moe_token_unpermute, npu_grouped_matmul)


def _recorded(module, fn):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)  # TypeError on a wrong keyword, as the real binding
        module.calls.append((fn.__name__, dict(bound.arguments)))
        return fn(*args, **kwargs)

    return wrapper


def make_module(without: tuple[str, ...] = ()) -> types.ModuleType:
    """A fresh fake ``torch_npu`` module (``without``: kernel names it lacks, like an old release)."""
    module = types.ModuleType("torch_npu")
    module.calls = []
    for fn in KERNELS:
        if fn.__name__ not in without:
            setattr(module, fn.__name__, _recorded(module, fn))
    return module
