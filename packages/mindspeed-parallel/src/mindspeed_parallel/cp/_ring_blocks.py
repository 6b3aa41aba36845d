"""One ring step's attention: which (query rows x key rows) blocks are visible, computing them,
merging them into the running result, and their exact gradients.

Rows live on dim 0 in both layouts: the sequence axis of SBND [S, B, N, D] and the token axis
of packed TND [T, N, D]. Every rank's local rows are two zig-zag chunks (per sequence for TND):
the *first half* (global chunk ``r``) and the *second half* (chunk ``2cp-1-r``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mindspeed_kernels import ops
from mindspeed_parallel.cp.data import zigzag_indices

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class Rows:
    """A subset of the local rows: ``sel`` a slice (SBND) or an int64 index tensor (TND);
    ``cu`` the cumulative per-sequence ends of the subset (TND only)."""

    sel: slice | torch.Tensor
    cu: tuple[int, ...] | None = None

    def take(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if isinstance(self.sel, slice):
            return x[(slice(None),) * dim + (self.sel,)]
        return x.index_select(dim, self.sel)

    def put(self, x: torch.Tensor, dim: int, value: torch.Tensor) -> None:
        if isinstance(self.sel, slice):
            x[(slice(None),) * dim + (self.sel,)] = value
        else:
            x.index_copy_(dim, self.sel, value)

    def add(self, x: torch.Tensor, dim: int, value: torch.Tensor) -> None:
        if isinstance(self.sel, slice):
            x[(slice(None),) * dim + (self.sel,)] += value
        else:
            x.index_add_(dim, self.sel, value)


@dataclass(frozen=True)
class Geometry:
    """The local row sets (all / first half / second half) for one call."""

    tnd: bool
    all: Rows
    first: Rows
    second: Rows

    @property
    def lse_dim(self) -> int:
        """The row axis of an lse tensor: [B, N, S] (dim 2) or TND [T, N] (dim 0)."""
        return 0 if self.tnd else 2


def make_geometry(q: torch.Tensor, local_cu: tuple[int, ...] | None) -> Geometry:
    """Halves of the local rows; ``local_cu`` (TND) are this rank's cumulative sequence ends."""
    if local_cu is None:
        half = q.shape[0] // 2
        return Geometry(False, Rows(slice(None)), Rows(slice(0, half)), Rows(slice(half, 2 * half)))
    starts = (0,) + local_cu[:-1]
    halves = [(end - start) // 2 for start, end in zip(starts, local_cu, strict=True)]
    firsts = [torch.arange(s, s + h) for s, h in zip(starts, halves, strict=True)]
    seconds = [torch.arange(s + h, s + 2 * h) for s, h in zip(starts, halves, strict=True)]
    half_cu = tuple(torch.tensor(halves).cumsum(0).tolist())
    return Geometry(
        True,
        Rows(slice(None), local_cu),
        Rows(torch.cat(firsts).to(q.device), half_cu),
        Rows(torch.cat(seconds).to(q.device), half_cu),
    )


@dataclass(frozen=True)
class Block:
    """Local query rows ``q`` against rows ``kv`` of the held K/V block. ``causal``: the diagonal
    block (positions increase along the rows on both sides, so it is plain causal); ``mask``:
    a general mask slice [sq, sk] or [B, 1, sq, sk] (True = masked), already on q's device."""

    q: Rows
    kv: Rows
    causal: bool = False
    mask: torch.Tensor | None = None


def causal_blocks(geom: Geometry, rank: int, src: int) -> list[Block]:
    """The visible part of local q (chunks r, 2cp-1-r) against the K/V of cp rank ``src``.

    With c(x) the global chunk index, chunks of q see chunks of K/V with a lower index in full,
    the same index causally, a higher index not at all. For src < r: c(q first) = r > src and
    c(q second) = 2cp-1-r > src, while 2cp-1-src > 2cp-1-r >= cp > r: all of q sees exactly the
    first half of K/V. For src > r: src > r and 2cp-1-src >= cp > r hide both K/V halves from q's
    first half, while 2cp-1-r > 2cp-1-src and 2cp-1-r >= cp > src show both to q's second half.
    So no computed block is ever fully masked, and every rank does the same work per step.
    """
    if src == rank:
        return [Block(geom.all, geom.all, causal=True)]
    if src < rank:
        return [Block(geom.all, geom.first)]
    return [Block(geom.second, geom.all)]


class MaskSlicer:
    """Slices a global general mask ([S, S] or [B, 1, S, S], True = masked, on any device) into
    the block of this rank's queries against the K/V of cp rank ``src``."""

    def __init__(self, mask: torch.Tensor, cp: int, rank: int, geom: Geometry, device: torch.device):
        self.mask, self.cp, self.geom, self.device = mask, cp, geom, device
        self.q_pos = zigzag_indices(mask.shape[-1], cp, rank, mask.device)

    def blocks(self, src: int) -> list[Block]:
        kv_pos = zigzag_indices(self.mask.shape[-1], self.cp, src, self.mask.device)
        sub = self.mask.index_select(-2, self.q_pos).index_select(-1, kv_pos)
        half = sub.shape[-1] // 2
        # keep only the halves with at least one visible (query, key) pair in the block: skips
        # fully masked blocks entirely and trims half-masked ones (exact: dropped rows see nothing)
        visible = ~sub
        q_keep = [bool(visible[..., :half, :].any()), bool(visible[..., half:, :].any())]
        kv_keep = [bool(visible[..., :half].any()), bool(visible[..., half:].any())]
        if not any(q_keep) or not any(kv_keep):
            return []
        q_rows, q_sel = self._pick(q_keep, half)
        kv_rows, kv_sel = self._pick(kv_keep, half)
        block_mask = sub[..., q_sel, :][..., kv_sel].to(self.device, non_blocking=True)
        return [Block(q_rows, kv_rows, mask=block_mask)]

    def _pick(self, keep: list[bool], half: int) -> tuple[Rows, slice]:
        if all(keep):
            return self.geom.all, slice(None)
        if keep[0]:
            return self.geom.first, slice(0, half)
        return self.geom.second, slice(half, 2 * half)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: Block, geom: Geometry, scale: float | None):
    """flash_attention on the block's rows: ``(out [rows, (B,) N, Dv], lse [B, N, rows] | [rows, N])``."""
    mode = 3 if block.causal else 0  # Sq == Skv on the diagonal block, so 3 is plain causal
    if geom.tnd:
        return ops.flash_attention(q, k, v, "TND", mode, scale=scale, actual_seq_qlen=block.q.cu, actual_seq_kvlen=block.kv.cu)
    n = q.shape[2]
    out, lse = ops.flash_attention(
        q.flatten(2), k.flatten(2), v.flatten(2), "SBH", mode, atten_mask=block.mask, scale=scale, num_heads=n
    )
    return out.unflatten(-1, (n, -1)), lse


def lse_to_rows(x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """lse layout -> [rows, (B,) N, 1], broadcastable against head-split outputs."""
    return x.unsqueeze(-1) if geom.tnd else x.permute(2, 0, 1).unsqueeze(-1)


def rows_to_lse(x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """[rows, (B,) N] -> lse layout ([T, N] or [B, N, S])."""
    return x if geom.tnd else x.permute(1, 2, 0)


def merge(acc_out: torch.Tensor, acc_lse: torch.Tensor, rows: Rows, out: torch.Tensor, lse: torch.Tensor, geom: Geometry):
    """Fold a block's (out, lse) into the float32 running result at ``rows`` (in place)."""
    layout = "TND" if geom.tnd else "SBH"
    prev_out, prev_lse = rows.take(acc_out), rows.take(acc_lse, geom.lse_dim)
    shape = prev_out.shape
    if not geom.tnd:  # SBH views of the [rows, B, N, Dv] results
        prev_out, out = prev_out.flatten(2), out.flatten(2)
    new_out, new_lse = ops.ring_attention_update(prev_out, prev_lse, out, lse, layout)
    rows.put(acc_out, 0, new_out.view(shape))
    rows.put(acc_lse, geom.lse_dim, new_lse)


def block_grads(q, k, v, dout, lse, delta, block: Block, geom: Geometry, scale):
    """Exact gradients of the loss w.r.t. this block's (q rows, k rows, v rows).

    Math. Let L_i be the global log-sum-exp of query row i (over every key of every step),
    P_ij = exp(s_ij - L_i) the global probabilities and D_i = dO_i . O_i. Full-attention
    backward is dV_j = sum_i P_ij dO_i and dS_ij = P_ij (dO_i . v_j - D_i), with dq, dk from
    dS by the chain rule through s = scale * q k^T. The block's own attention gives
    o_b = sum_j p_ij v_j with p_ij = exp(s_ij - lse_b,i), so P_ij = w_i p_ij with
    w_i = exp(lse_b,i - L_i). Back-propagating through flash_attention's (o_b, lse_b) with
        g_o = w dO   and   g_lse = w (dO . o_b - D)
    gives dS_ij = w p_ij (dO.v_j - dO.o_b) [through o_b] + g_lse,i p_ij [through lse_b, whose
    derivative is p_ij] = P_ij (dO.v_j - D_i), and dV_j = sum_i w_i p_ij dO_i = sum_i P_ij dO_i:
    exactly the full-attention gradients restricted to the block. Rows with no visible key in
    the block (lse_b = -inf) get w = 0.
    """
    leaves = [block.q.take(q).detach().requires_grad_(), block.kv.take(k).detach().requires_grad_(),
              block.kv.take(v).detach().requires_grad_()]  # fmt: skip
    with torch.enable_grad():
        out_b, lse_b = attend(*leaves, block, geom, scale)
    glob = block.q.take(lse, geom.lse_dim)
    live = lse_b != _NEG_INF
    w = torch.where(live, (lse_b.detach() - torch.where(live, glob, 0.0)).exp(), 0.0)
    g = block.q.take(dout).to(lse.dtype)  # float32 (float64 for float64 inputs)
    dot = rows_to_lse((g * out_b.detach().to(lse.dtype)).sum(-1), geom)
    g_lse = w * (dot - block.q.take(delta, geom.lse_dim))
    g_out = (lse_to_rows(w, geom) * g).to(out_b.dtype)
    return torch.autograd.grad((out_b, lse_b), leaves, (g_out, g_lse.to(lse_b.dtype)))
