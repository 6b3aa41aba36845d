"""Ulysses context parallelism (``context_parallel_algo='ulysses_cp_algo'``).

Each rank of the Ulysses group holds a contiguous ``1/u`` slice of the sequence with every head.
One all-to-all turns that into the whole sequence with ``1/u`` of the heads, attention runs
locally (any ``attn_fn``), and the reverse all-to-all restores the sequence split:

    [S/u, B, N, D] --all-to-all--> [S, B, N/u, D] --attn_fn--> [S, B, N/u, Dv] --all-to-all--> [S/u, B, N, Dv]

Packed sequences (TND, ``cu_seqlens``) are split per sequence: rank ``r`` holds chunk ``r`` of
every sequence, so after the exchange the rank holds every sequence whole (for its heads) and
the tokens are reordered into the global packed order before ``attn_fn`` sees them.

GQA/MQA: the key/value heads are split over the group too. When ``Nkv`` does not divide by the
group size, each kv head is repeated (``kv_head_repeat_before_uly_alltoall``) just enough that
it does, keeping query head ``h`` on kv head ``h // (Nq // Nkv)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mindspeed_kernels import ops
from mindspeed_parallel.cp.all_to_all import all_to_all

__all__ = ["LocalAttention", "kv_repeat_factor", "local_attention", "ulysses_attention"]

CuSeqlens = Sequence[int] | torch.Tensor
AttnFn = Callable[..., torch.Tensor]


@dataclass(frozen=True, eq=False)
class LocalAttention:
    """Single-process attention on megatron's layouts through ``mindspeed_kernels.ops.flash_attention``.

    Call as ``fn(q, k, v, cu_seqlens=None) -> out``: SBND q [S, B, Nq, D], k/v [S, B, Nkv, D|Dv]
    -> out [S, B, Nq, Dv]; or packed TND q [T, Nq, D] with ``cu_seqlens`` (cumulative end
    offsets, e.g. [3, 8]) -> out [T, Nq, Dv]. Out has q's dtype. Build it with `local_attention`.
    """

    causal: bool = True
    attention_mask: torch.Tensor | None = None
    scale: float | None = None
    backend: str | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: CuSeqlens | None = None) -> torch.Tensor:
        mask = None if self.attention_mask is None else self.attention_mask.to(q.device, non_blocking=True)
        # Sq == Skv here (self-attention), so bottom-right causal (mode 3) is the plain causal mask.
        mode = 3 if self.causal else 0
        common = dict(atten_mask=mask, scale=self.scale, backend=self.backend)
        if cu_seqlens is not None:
            if q.dim() != 3:
                raise ValueError(f"cu_seqlens: packed attention needs TND q [T, N, D], got q of shape {tuple(q.shape)}")
            out, _ = ops.flash_attention(q, k, v, "TND", mode, actual_seq_qlen=cu_seqlens, actual_seq_kvlen=cu_seqlens, **common)
            return out
        if q.dim() != 4:
            raise ValueError(f"q: expected SBND [S, B, N, D] (or TND with cu_seqlens), got shape {tuple(q.shape)}")
        # SBND is BSND with the first two axes swapped: transposed views, no copy on the way in.
        out, _ = ops.flash_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), "BSND", mode, **common)
        return out.transpose(0, 1).contiguous()


def local_attention(
    causal: bool = True, attention_mask: torch.Tensor | None = None, scale: float | None = None, backend: str | None = None
) -> LocalAttention:
    """The default ``attn_fn``: plain attention over the sequence a rank holds whole.

    ``causal`` selects the causal mask (cp_attention_mask_type 'causal'); a general
    ``attention_mask`` (bool, True = masked out, [S, S] or [B, 1, S, S]; for TND a [S, S] mask
    whose top-left corner applies to each sequence) needs ``causal=False`` and must contain any
    causal part itself (cp_attention_mask_type 'general'). It may live on CPU: it is moved to q's
    device per call. ``scale`` defaults to ``D ** -0.5``; ``backend`` picks the kernel backend.
    """
    if attention_mask is not None:
        if causal:
            raise ValueError("attention_mask: a general mask replaces the causal one; pass causal=False with it")
        if attention_mask.dtype != torch.bool or attention_mask.dim() not in (2, 4):
            raise ValueError(
                f"attention_mask: expected a bool [S, S] or [B, 1, S, S] tensor, got {attention_mask.dtype} "
                f"of shape {tuple(attention_mask.shape)}"
            )
    return LocalAttention(causal=causal, attention_mask=attention_mask, scale=scale, backend=backend)


def kv_repeat_factor(num_q_heads: int, num_kv_heads: int, degree: int, kv_head_repeat: bool = True) -> int:
    """How many times each kv head is repeated before the Ulysses all-to-all (1 = no repeat).

    The smallest ``r`` with ``num_kv_heads * r`` divisible by ``degree`` and dividing
    ``num_q_heads`` (so query head ``h`` still meets kv head ``h // (Nq // Nkv)``). Raises
    ValueError when the heads cannot be split, or a repeat is needed and ``kv_head_repeat`` is off.
    """
    if num_q_heads % degree:
        raise ValueError(
            f"num_attention_heads={num_q_heads} must divide by the ulysses degree {degree}; "
            "choose ulysses_degree_in_cp (or the CP size) dividing the head count"
        )
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_query_groups={num_kv_heads} must divide num_attention_heads={num_q_heads}")
    if num_kv_heads % degree == 0:
        return 1
    if not kv_head_repeat:
        raise ValueError(
            f"num_query_groups={num_kv_heads} does not divide by the ulysses degree {degree}: enable "
            "kv_head_repeat_before_uly_alltoall (kv_head_repeat=True) or pick a degree dividing the kv heads"
        )
    group = num_q_heads // num_kv_heads
    # r = group always works (it is plain MHA), so the loop always returns.
    for r in range(1, group + 1):
        if (num_kv_heads * r) % degree == 0 and group % r == 0:
            return r
    raise AssertionError("unreachable: r = Nq // Nkv satisfies both conditions")


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    attn_fn: AttnFn,
    kv_head_repeat: bool = True,
    cu_seqlens: CuSeqlens | None = None,
) -> torch.Tensor:
    """Attention over a sequence split contiguously across ``group`` (Ulysses all-to-all).

    SBND: q [S/u, B, Nq, D], k/v [S/u, B, Nkv, D|Dv], rank ``r`` of ``group`` (size ``u``)
    holding tokens ``[r*S/u, (r+1)*S/u)``. Packed TND: q [T/u, Nq, D], k/v [T/u, Nkv, D|Dv] with
    ``cu_seqlens`` the *local* cumulative ends (global / u), each sequence split in ``u``
    contiguous chunks. ``attn_fn(q, k, v, cu_seqlens=None) -> out`` runs on the full sequence
    and ``Nq/u`` heads (TND: tokens in global packed order, ``cu_seqlens`` the global ends, in
    the type given); see `local_attention`. Returns out [S/u, B, Nq, Dv] (TND [T/u, Nq, Dv]) in
    q's layout, computed in q's dtype by ``attn_fn``. Nq must divide by ``u``; for Nkv see
    `kv_repeat_factor`. Differentiable in q, k and v.
    """
    packed = cu_seqlens is not None
    head_dim = _check_layout(q, k, v, packed)
    degree = dist.get_world_size(group)
    repeat = kv_repeat_factor(q.shape[head_dim], k.shape[head_dim], degree, kv_head_repeat)
    # Validate cu_seqlens before any communication, so a bad batch fails on every rank alike.
    local_ends = _cu_list(cu_seqlens, q.shape[0]) if packed else None
    if degree == 1:
        return attn_fn(q, k, v, cu_seqlens=cu_seqlens)
    if repeat > 1:
        k = k.repeat_interleave(repeat, dim=head_dim)
        v = v.repeat_interleave(repeat, dim=head_dim)
    q, k, v = (all_to_all(t, group, scatter_dim=head_dim, gather_dim=0) for t in (q, k, v))
    if packed:
        out = _packed_attention(q, k, v, attn_fn, local_ends, degree, cu_seqlens)
    else:
        out = attn_fn(q, k, v, cu_seqlens=None)
    return all_to_all(out, group, scatter_dim=0, gather_dim=head_dim)


def _packed_attention(q, k, v, attn_fn: AttnFn, local_ends: list[int], degree: int, cu_seqlens: CuSeqlens) -> torch.Tensor:
    """``attn_fn`` on exchanged TND rows (rank-blocked order) via the global packed order."""
    order = _global_order(local_ends, degree, q.device)
    q, k, v = (t.index_select(0, order) for t in (q, k, v))
    global_ends = [end * degree for end in local_ends]
    if isinstance(cu_seqlens, torch.Tensor):
        global_ends = torch.tensor(global_ends, dtype=cu_seqlens.dtype, device=cu_seqlens.device)
    out = attn_fn(q, k, v, cu_seqlens=global_ends)
    return out.index_select(0, torch.argsort(order))  # back to rank-blocked order for the exchange


def _check_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: bool) -> int:
    """Validate q/k/v shapes; return the head dimension's index."""
    ndim, name = (3, "TND [T, N, D]") if packed else (4, "SBND [S, B, N, D]")
    for label, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != ndim:
            hint = " (cu_seqlens given)" if packed else " (packed TND needs cu_seqlens)"
            raise ValueError(f"{label}: expected {name}{hint}, got shape {tuple(t.shape)}")
    head_dim = ndim - 2
    if k.shape[:head_dim] != q.shape[:head_dim] or v.shape[:head_dim] != q.shape[:head_dim]:
        raise ValueError(f"k, v: leading dims must equal q's {tuple(q.shape[:head_dim])}, got {tuple(k.shape)}, {tuple(v.shape)}")
    if v.shape[head_dim] != k.shape[head_dim] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k, v: k needs q's head dim, v k's head count; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    return head_dim


def _cu_list(cu_seqlens: CuSeqlens, tokens: int) -> list[int]:
    """Local cumulative ends as ints, checked against the local token count."""
    ends = [int(e) for e in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
    if not ends or ends[-1] != tokens or any(b <= a for a, b in zip([0, *ends[:-1]], ends, strict=True)):
        raise ValueError(f"cu_seqlens: expected strictly increasing local end offsets ending at T_local={tokens}, got {ends}")
    return ends


def _global_order(local_ends: list[int], degree: int, device: torch.device) -> torch.Tensor:
    """For each token of the global packed order, its row after the all-to-all.

    After the exchange rows ``[r*T, (r+1)*T)`` (T local tokens) are rank ``r``'s tokens: chunk
    ``r`` of every sequence. Sequence ``j``'s global order is its chunks 0..u-1 in turn.
    """
    tokens = local_ends[-1]
    pieces = []
    for start, end in zip([0, *local_ends[:-1]], local_ends, strict=True):
        span = torch.arange(start, end, device=device)
        pieces.extend(span + rank * tokens for rank in range(degree))
    return torch.cat(pieces)
