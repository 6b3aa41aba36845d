"""flash_attention -> ``torch_npu.npu_fusion_attention(query, key, value, head_num, input_layout,
pse=None, padding_mask=None, atten_mask=None, scale=1., keep_prob=1., pre_tockens=2147483647,
next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False)
-> (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)``.

Mapping (the contract's semantics were written to match this kernel):

- layouts SBH/BSH/BSND/BNSD/TND and GQA are native; ``head_num`` is Nq; ``keep_prob = 1 - dropout_p``
  (the dropout mask comes from the NPU generator and is replayed by the kernel's backward);
  ``scale`` defaults to D ** -0.5 (the kernel's default is 1, so it is always passed).
- masks: modes 2/3/4 pass the documented compressed mask, a 2048 x 2048 bool upper triangle;
  mode 1 passes the user mask; mode 0 passes the user mask OR'ed with the pre/next band (the
  kernel requires the two to agree). User masks are materialised in a documented shape (SS,
  11SS, B1SS or BNSS; TND: [max Sq, max Skv]).
- ALiBi: the kernel adds ``pse`` before scaling (``scale * (q k^T + pse)``), so
  ``pse = bias / scale`` in q's dtype, [1|B, Nq, Sq, Skv]; for Sq == Skv > 1024 with modes 2/3
  only the last 1024 rows are passed (the documented alibi compression). Otherwise pse costs
  Nq * Sq * Skv elements of memory, unlike the reference backend.
- lse: ``softmax_max + log(softmax_sum)`` (value 0 of the 8 replicas). For TND the [T, N, 8]
  outputs hold N-major data by default (documented: "NTD" unless ``softmax_layout='TND'``, a
  parameter older torch_npu lacks), so they are read as [N, T, 8].
- fully masked rows: when the arguments allow them, ``inner_precise=2`` is passed (documented:
  computes such "invalid rows" correctly), rows whose statistics show no visible key
  (``softmax_sum <= 0`` or ``softmax_max <= -1e30``, the assumed sentinels) get out 0 and
  lse -inf. For TND, torch_npu documents that a user mask must not mask a whole row; such rows
  are undefined on NPU.
- gradients: out's come from torch_npu's autograd formula. The kernel's softmax statistics
  receive no gradient there, so the lse gradient is added here: ``dq += scale * g * (P k)`` and
  ``dk += scale * P^T (g * q)``, obtained from one more kernel call with ``value = k`` and its
  autograd gradient for value (run only when lse is used in the loss).

Calls the kernel cannot express run the reference implementation: float64, head dim > 768,
Nq > 256 (documented ranges), TND with ALiBi (varlen pse is documented only in compressed
form), and TND mode 3 with a sequence whose Sq > Skv (documented as unsupported).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mindspeed_kernels._layouts import heads, lse_like_heads
from mindspeed_kernels.backends._lse_grad import DifferentiableLse
from mindspeed_kernels.backends.npu._common import KERNEL_DTYPES, reference_op
from mindspeed_kernels.ops.attention import NO_LIMIT

MASK_SIDE = 2048  # the compressed causal mask of sparse modes 2-4
PSE_ROWS = 1024  # rows kept by the documented alibi compression
EMPTY_MAX = -1e30  # a softmax_max at or below this marks a row with no visible key
MAX_HEAD_DIM, MAX_HEADS = 768, 256


@dataclass(frozen=True)
class Geometry:
    n_q: int
    n_kv: int
    d: int
    s_q: int
    s_kv: int
    batch: int


def geometry(q, k, layout: str, num_heads: int | None) -> Geometry:
    """Heads, head dim, sequence lengths (TND: total tokens) and batch of validated inputs."""
    if layout in ("SBH", "BSH"):
        d = q.shape[-1] // num_heads
        n_q, n_kv = num_heads, k.shape[-1] // d
    else:
        axis = 2 if layout == "BSND" else 1
        n_q, n_kv, d = q.shape[axis], k.shape[axis], q.shape[-1]
    s_axis = {"SBH": 0, "BSH": 1, "BSND": 1, "BNSD": 2, "TND": 0}[layout]
    batch = {"SBH": q.shape[1], "TND": 1}.get(layout, q.shape[0])
    return Geometry(n_q, n_kv, d, q.shape[s_axis], k.shape[s_axis], batch)


def sequences(geo: Geometry, q_ends, kv_ends) -> list[tuple[int, int]]:
    """(Sq, Skv) of every sequence (TND: from the cumulative ends)."""
    if q_ends is None:
        return [(geo.s_q, geo.s_kv)]
    starts = lambda ends: (0, *ends[:-1])
    return [(qe - qs, ke - ks) for qs, qe, ks, ke in zip(starts(q_ends), q_ends, starts(kv_ends), kv_ends, strict=True)]


def fallback_reason(dtype, layout: str, sparse_mode: int, has_alibi: bool, geo: Geometry, seqs) -> str | None:
    """Why the kernel cannot run this call (then the reference does), or None."""
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} (the kernel takes float16, bfloat16, float32)"
    if geo.d > MAX_HEAD_DIM or geo.n_q > MAX_HEADS:
        return f"head dim {geo.d} / {geo.n_q} heads (the kernel takes D <= {MAX_HEAD_DIM}, Nq <= {MAX_HEADS})"
    if layout == "TND" and has_alibi:
        return "ALiBi with TND (varlen pse is documented only in compressed form)"
    if layout == "TND" and sparse_mode == 3 and any(s_q > s_kv for s_q, s_kv in seqs):
        return "TND sparse_mode=3 with a sequence longer in q than in kv (documented as unsupported)"
    return None


def may_have_empty_rows(sparse_mode: int, has_mask: bool, pre: int, nxt: int, seqs) -> bool:
    """Whether some query row can see no key (then the kernel gets ``inner_precise=2``)."""
    if has_mask:
        return True
    if sparse_mode == 3:
        return any(s_q > s_kv for s_q, s_kv in seqs)
    if sparse_mode == 4:  # rows see [i + delta - pre, i + delta + next]; the extreme rows decide
        return pre < 0 or pre + nxt < 0 or any(s_kv - s_q + nxt < 0 for s_q, s_kv in seqs)
    return False


@functools.lru_cache(maxsize=8)
def _causal_mask(device: str) -> torch.Tensor:
    return torch.ones(MASK_SIDE, MASK_SIDE, dtype=torch.bool, device=device).triu(1)


def _outside_band(s_q: int, s_kv: int, pre: int, nxt: int, device) -> torch.Tensor:
    """True where ``j - i`` leaves [-pre, next] (mode 0's band, aligned top-left)."""
    rel = torch.arange(s_kv, device=device)[None, :] - torch.arange(s_q, device=device)[:, None]
    return (rel < -pre) | (rel > nxt)


def _dense_mask(mask: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """A mask broadcastable to [B, Nq, Sq, Skv] in a documented shape: SS, B1SS or BNSS."""
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    b, n = m.shape[0], m.shape[1]
    if n == 1 and b == 1:
        return m[0, 0].expand(geo.s_q, geo.s_kv)
    return m.expand(b if n == 1 else geo.batch, n, geo.s_q, geo.s_kv)


def kernel_mask(atten_mask, layout: str, sparse_mode: int, pre: int, nxt: int, geo: Geometry, seqs, device):
    """(atten_mask, pre_tockens, next_tockens) for the kernel."""
    if sparse_mode >= 2:
        band = (pre, nxt) if sparse_mode == 4 else (NO_LIMIT, NO_LIMIT)  # modes 2/3 ignore pre/next
        return _causal_mask(str(device)), *band
    if atten_mask is None:
        return None, NO_LIMIT, NO_LIMIT
    if layout == "TND":
        s_q, s_kv = max(s for s, _ in seqs), max(s for _, s in seqs)
        mask = atten_mask[:s_q, :s_kv]
    else:
        s_q, s_kv = geo.s_q, geo.s_kv
        mask = _dense_mask(atten_mask, geo)
    if sparse_mode == 1 or (pre == NO_LIMIT and nxt == NO_LIMIT):
        return mask.contiguous(), NO_LIMIT, NO_LIMIT
    return (mask | _outside_band(s_q, s_kv, pre, nxt, device)).contiguous(), pre, nxt


def alibi_pse(slopes: torch.Tensor, geo: Geometry, sparse_mode: int, scale: float, dtype) -> torch.Tensor:
    """``-slope * |i + delta - j| / scale`` as [1|B, Nq, rows, Skv] (rows: Sq, or the last 1024)."""
    rows = torch.arange(geo.s_q, device=slopes.device)
    if geo.s_q == geo.s_kv > PSE_ROWS and sparse_mode in (2, 3):
        rows = rows[-PSE_ROWS:]
    cols = torch.arange(geo.s_kv, device=slopes.device)
    dist = (rows[:, None] + (geo.s_kv - geo.s_q) - cols[None, :]).abs().float()
    return (slopes.float().reshape(-1, geo.n_q, 1, 1) * dist * (-1.0 / scale)).to(dtype)


def lse_from_stats(smax: torch.Tensor, ssum: torch.Tensor, layout: str, n_q: int):
    """(lse [B, N, S] or [T, N], empty rows) from the kernel's softmax statistics."""
    if layout == "TND":
        tokens = smax.shape[0]
        mx, sm = (s.reshape(n_q, tokens, -1)[..., 0].t() for s in (smax, ssum))
    else:
        mx, sm = smax[..., 0], ssum[..., 0]
    empty = ~(mx > EMPTY_MAX) | ~(sm > 0)
    return torch.where(empty, float("-inf"), mx + sm.log()), empty


def _rerun(q, k, value, *, head_num, layout, kwargs):
    import torch_npu

    return torch_npu.npu_fusion_attention(q, k, value, head_num, layout, **{**kwargs, "keep_prob": 1.0})[0]


def flash_attention(
    q, k, v, layout="BNSD", sparse_mode=0, pre_tokens=NO_LIMIT, next_tokens=NO_LIMIT, *, atten_mask=None,
    scale=None, dropout_p=0.0, actual_seq_qlen=None, actual_seq_kvlen=None, num_heads=None, alibi_slopes=None,
):
    """See :func:`mindspeed_kernels.ops.flash_attention` and this module's docstring."""
    geo = geometry(q, k, layout, num_heads)
    seqs = sequences(geo, actual_seq_qlen, actual_seq_kvlen)
    if fallback_reason(q.dtype, layout, sparse_mode, alibi_slopes is not None, geo, seqs) is not None:
        return reference_op("flash_attention")(
            q, k, v, layout, sparse_mode, pre_tokens, next_tokens, atten_mask=atten_mask, scale=scale,
            dropout_p=dropout_p, actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
            num_heads=num_heads, alibi_slopes=alibi_slopes,
        )
    import torch_npu

    scale = float(geo.d**-0.5 if scale is None else scale)
    mask, pre, nxt = kernel_mask(atten_mask, layout, sparse_mode, pre_tokens, next_tokens, geo, seqs, q.device)
    empty_possible = may_have_empty_rows(sparse_mode, atten_mask is not None, pre_tokens, next_tokens, seqs)
    kwargs = dict(
        pse=None if alibi_slopes is None else alibi_pse(alibi_slopes, geo, sparse_mode, scale, q.dtype),
        atten_mask=mask, scale=scale, keep_prob=1.0 - float(dropout_p), pre_tockens=pre, next_tockens=nxt,
        inner_precise=2 if empty_possible else 0, sparse_mode=sparse_mode,
        actual_seq_qlen=None if actual_seq_qlen is None else [int(e) for e in actual_seq_qlen],
        actual_seq_kvlen=None if actual_seq_kvlen is None else [int(e) for e in actual_seq_kvlen],
    )
    out, smax, ssum = torch_npu.npu_fusion_attention(q, k, v, geo.n_q, layout, **kwargs)[:3]
    lse, empty = lse_from_stats(smax, ssum, layout, geo.n_q)
    if empty_possible:
        out = heads(out, layout, geo.n_q).masked_fill(lse_like_heads(empty, layout), 0.0).reshape(out.shape)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        rerun = functools.partial(_rerun, head_num=geo.n_q, layout=layout, kwargs=kwargs)
        lse = DifferentiableLse.apply(q, k, lse, rerun, layout, geo.n_q, scale)
    return out, lse
