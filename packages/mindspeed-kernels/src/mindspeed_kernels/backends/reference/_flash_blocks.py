"""Block-wise attention kernels of the reference backend: one [B, N, S, D] problem at a time.

Forward walks query blocks and, inside each, key/value blocks with an online softmax (running
max, running sum, float32 accumulator); backward recomputes the probabilities of each block
from the saved log-sum-exp. Memory is O(S) plus one [B, Nq, block_q, block_kv] float32 block
and a few of its temporaries. GQA: the G = Nq / Nkv query heads sharing a kv head are folded
into the rows of one matmul ([B, Nkv, G * block_q, D] against [B, Nkv, D, block_kv]), so K/V
are never repeated.

Score masking is positional (a band ``lo <= j - i - offset <= hi``, skipped entirely for blocks
outside it) plus an optional bool ``atten_mask`` (True = masked out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK_Q = 512  # query rows per block (tests shrink these to exercise many odd-sized blocks)
BLOCK_KV = 1024  # key columns per block
BLOCK_ELEMENTS = 1 << 22  # bound on B * Nq * block_q * block_kv: 16 MiB per float32 temporary
MIN_BLOCK = 64  # never shrink below this for memory, so Python overhead stays small

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Band:
    """Key ``j`` is visible from query ``i`` iff ``lo <= j - i - offset <= hi``."""

    offset: int
    lo: float
    hi: float

    def masked(self, i0: int, j0: int, bq: int, bk: int, device) -> torch.Tensor:
        """Bool [bq, bk] block of the complement of the band (True = masked), built with triangle
        ops on bool tensors rather than an int64 grid of j - i."""
        shift = self.offset + i0 - j0  # j_local - i_local must lie in [lo + shift, hi + shift]
        lo, hi = (max(-bq, min(bk, x + shift)) if math.isfinite(x) else x for x in (self.lo, self.hi))
        ones = torch.ones(bq, bk, dtype=torch.bool, device=device)
        inside = ones.triu(int(lo)) if math.isfinite(lo) else ones
        return ~(inside.tril_(int(hi)) if math.isfinite(hi) else inside)

    def span(self, i0: int, i1: int, j0: int, j1: int) -> int:
        """0: block fully outside the band, 1: fully inside, 2: partly (needs an explicit mask)."""
        d_min, d_max = j0 - (i1 - 1) - self.offset, (j1 - 1) - i0 - self.offset
        if d_max < self.lo or d_min > self.hi:
            return 0
        return 1 if d_min >= self.lo and d_max <= self.hi else 2


@dataclass(frozen=True)
class Spec:
    """Everything but q/k/v that one problem needs. ``mask``: bool, expanded to [B, Nq, Sq, Skv];
    ``slopes``: float32 [B or 1, Nq]; ``delta`` = Skv - Sq (ALiBi distance); ``stream`` tells
    problems of one call apart in the dropout random stream; ``dtype``: float32, or float64 for
    float64 inputs, used for every score, probability and accumulator."""

    dtype: torch.dtype
    scale: float
    band: Band | None
    mask: torch.Tensor | None
    slopes: torch.Tensor | None
    delta: int
    dropout_p: float
    seed: int
    stream: int
    block_q: int
    block_kv: int


def block_sizes(rows: int, s_q: int, s_kv: int, limits: tuple[int, int, int]) -> tuple[int, int]:
    """Block sizes for ``rows`` = B * Nq given ``limits`` = (BLOCK_Q, BLOCK_KV, BLOCK_ELEMENTS):
    the first two, halved (not below MIN_BLOCK) until one block has at most BLOCK_ELEMENTS scores."""
    max_q, max_kv, elements = limits
    bq, bk = max(1, min(max_q, s_q)), max(1, min(max_kv, s_kv))
    while rows * bq * bk > elements and max(bq, bk) > MIN_BLOCK:
        if bk >= bq:
            bk = max(MIN_BLOCK, bk // 2)
        else:
            bq = max(MIN_BLOCK, bq // 2)
    return bq, bk


def _block_seed(seed: int, *indices: int) -> int:
    """A well-mixed 63-bit seed for one block, so neighbouring blocks draw unrelated masks."""
    h = seed & _MASK64
    for x in indices:
        h = (h ^ (x + 0x9E3779B97F4A7C15)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def _keep(spec: Spec, shape, qi: int, kj: int, device) -> torch.Tensor | None:
    """The dropout multiplier of one block (0 or 1 / (1 - p)); identical in forward and backward."""
    if spec.dropout_p == 0.0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(_block_seed(spec.seed, spec.stream, qi, kj))
    keep = torch.rand(shape, generator=gen, device=device, dtype=torch.float32) >= spec.dropout_p
    return keep.to(spec.dtype).div_(1.0 - spec.dropout_p)


def _scores(spec: Spec, qf: torch.Tensor, kb: torch.Tensor, i0: int, j0: int, span: int, groups: int) -> torch.Tensor:
    """Scaled, biased, masked scores of one block: [B, Nkv, G * bq, bk] in spec.dtype, -inf where masked."""
    b, n_kv, rows, _ = qf.shape
    bq, bk = rows // groups, kb.shape[2]
    s = torch.matmul(qf, kb.transpose(-1, -2)).mul_(spec.scale)
    s5 = s.view(b, n_kv, groups, bq, bk)
    device = qf.device
    if spec.slopes is not None:
        i = torch.arange(i0 + spec.delta, i0 + spec.delta + bq, device=device, dtype=spec.dtype).unsqueeze(1)
        dist = (i - torch.arange(j0, j0 + bk, device=device, dtype=spec.dtype)).abs_()
        s5.sub_(spec.slopes.view(-1, n_kv, groups, 1, 1) * dist)
    if span == 2:
        s5.masked_fill_(spec.band.masked(i0, j0, bq, bk, device), float("-inf"))
    if spec.mask is not None:
        m = spec.mask[:, :, i0 : i0 + bq, j0 : j0 + bk]
        s5.masked_fill_(m.reshape(m.shape[0], n_kv, groups, bq, bk), float("-inf"))
    return s


def _fold(x: torch.Tensor, n_kv: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, Nq, s, D] -> [B, Nkv, G * s, D] in ``dtype``: the query heads of one kv head stacked as rows."""
    b, n_q, s, d = x.shape
    return x.to(dtype).reshape(b, n_kv, (n_q // n_kv) * s, d)


def _unfold(x: torch.Tensor, n_q: int) -> torch.Tensor:
    b, n_kv, rows, d = x.shape
    return x.reshape(b, n_q, rows // (n_q // n_kv), d)


def _kv_blocks(spec: Spec, i0: int, i1: int, s_kv: int):
    """(index, j0, j1, span) of the key blocks query rows [i0, i1) can see."""
    for kj, j0 in enumerate(range(0, s_kv, spec.block_kv)):
        j1 = min(j0 + spec.block_kv, s_kv)
        span = 1 if spec.band is None else spec.band.span(i0, i1, j0, j1)
        if span:
            yield kj, j0, j1, span


def forward(spec: Spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Attention of q [B, Nq, Sq, D] over k [B, Nkv, Skv, D], v [B, Nkv, Skv, Dv] (any float dtype,
    any strides), written into ``out`` [B, Nq, Sq, Dv] and ``lse`` [B, Nq, Sq] (cast to their dtypes)."""
    n_q, s_q, n_kv, s_kv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    groups = n_q // n_kv
    for qi, i0 in enumerate(range(0, s_q, spec.block_q)):
        i1 = min(i0 + spec.block_q, s_q)
        qf = _fold(q[:, :, i0:i1], n_kv, spec.dtype)
        m = qf.new_full(qf.shape[:3], float("-inf"))
        row_sum = qf.new_zeros(qf.shape[:3])
        acc = qf.new_zeros(*qf.shape[:3], v.shape[-1])
        for kj, j0, j1, span in _kv_blocks(spec, i0, i1, s_kv):
            s = _scores(spec, qf, k[:, :, j0:j1].to(spec.dtype), i0, j0, span, groups)
            m_new = torch.maximum(m, s.amax(-1))
            base = m_new.masked_fill(m_new == float("-inf"), 0.0)  # keeps -inf - -inf out of exp
            p = s.sub_(base.unsqueeze(-1)).exp_()
            corr = (m - base).exp_()
            row_sum = row_sum.mul_(corr).add_(p.sum(-1))
            keep = _keep(spec, p.shape, qi, kj, q.device)
            if keep is not None:
                p.mul_(keep)
            acc = acc.mul_(corr.unsqueeze(-1)).add_(torch.matmul(p, v[:, :, j0:j1].to(spec.dtype)))
            m = m_new
        seen = row_sum > 0  # rows with no visible key keep out 0 and lse -inf
        l_safe = torch.where(seen, row_sum, 1.0)
        lse_b = torch.where(seen, m + l_safe.log(), float("-inf"))
        out_b = acc / l_safe.unsqueeze(-1)
        out[:, :, i0:i1] = _unfold(out_b, n_q)
        lse[:, :, i0:i1] = _unfold(lse_b.unsqueeze(-1), n_q).squeeze(-1)


def backward(spec: Spec, q, k, v, out, lse, dout, dlse, dq, dk, dv) -> None:
    """Gradients of :func:`forward` (same shapes), accumulated into ``dq``, ``dk``, ``dv`` (spec.dtype).
    ``dlse`` [B, Nq, Sq] (or None) is the gradient reaching the log-sum-exp output."""
    n_q, s_q, n_kv, s_kv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    groups = n_q // n_kv
    for qi, i0 in enumerate(range(0, s_q, spec.block_q)):
        i1 = min(i0 + spec.block_q, s_q)
        fold = lambda x: _fold(x[:, :, i0:i1], n_kv, spec.dtype)
        qf, do = fold(q), fold(dout)
        lse_b = fold(lse.unsqueeze(-1))
        # d lse / d s = P, so the lse gradient enters as a shift of D_i = rowsum(dO * O)
        d_row = (do * fold(out)).sum(-1, keepdim=True)
        if dlse is not None:
            d_row -= fold(dlse.unsqueeze(-1))
        lse_b = lse_b.masked_fill(lse_b == float("-inf"), 0.0)  # dead rows: all scores -inf, P = 0
        dqf = torch.zeros_like(qf)
        for kj, j0, j1, span in _kv_blocks(spec, i0, i1, s_kv):
            kb, vb = k[:, :, j0:j1].to(spec.dtype), v[:, :, j0:j1].to(spec.dtype)
            p = _scores(spec, qf, kb, i0, j0, span, groups).sub_(lse_b).exp_()
            dp = torch.matmul(do, vb.transpose(-1, -2))
            keep = _keep(spec, p.shape, qi, kj, q.device)
            p_used = p if keep is None else p * keep
            if keep is not None:
                dp.mul_(keep)
            dv[:, :, j0:j1] += torch.matmul(p_used.transpose(-1, -2), do)
            ds = p.mul_(dp.sub_(d_row)).mul_(spec.scale)
            dqf.add_(torch.matmul(ds, kb))
            dk[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), qf)
        dq[:, :, i0:i1] += _unfold(dqf, n_q)
