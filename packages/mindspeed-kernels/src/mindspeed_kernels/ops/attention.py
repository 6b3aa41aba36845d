"""Flash attention and the ring-attention merge step.

Semantics follow torch_npu ``npu_fusion_attention`` / ``npu_ring_attention_update`` so that the
``npu`` backend is a direct mapping. Every backend, including ``reference``, works block by
block with an online softmax: memory is O(sequence), never a [Sq, Skv] float32 score matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mindspeed_kernels.ops import _attention_args as args
from mindspeed_kernels.ops._dispatch import call

LAYOUTS = ("SBH", "BSH", "BSND", "BNSD", "TND")
SPARSE_MODES = (0, 1, 2, 3, 4)
NO_LIMIT = 2**31 - 1  # "unbounded" pre_tokens / next_tokens, as in torch_npu


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: str = "BNSD",
    sparse_mode: int = 0,
    pre_tokens: int = NO_LIMIT,
    next_tokens: int = NO_LIMIT,
    *,
    atten_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    actual_seq_qlen: Sequence[int] | torch.Tensor | None = None,
    actual_seq_kvlen: Sequence[int] | torch.Tensor | None = None,
    num_heads: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention ``softmax(scale * q k^T + bias, masked) v`` -> ``(out, softmax_lse)``.

    Layouts (B batch, S sequence, N heads, D head dim, H = N * D, T = total packed tokens):
    ``SBH`` [S, B, H], ``BSH`` [B, S, H], ``BSND`` [B, S, N, D], ``BNSD`` [B, N, S, D],
    ``TND`` [T, N, D] (variable-length sequences packed back to back; ``actual_seq_qlen`` and
    ``actual_seq_kvlen`` are the *cumulative* end offsets, e.g. ``[3, 8]`` for lengths 3 and 5,
    strictly increasing (no empty sequence), ending at T, one per sequence in both; each sequence
    attends only within itself, and i, j, delta below are taken per sequence). ``SBH``/``BSH``
    need ``num_heads`` (of q); for other layouts it is optional and must match q's heads.

    GQA/MQA: k and v may have fewer heads ``Nkv`` dividing ``Nq``; query head ``h`` uses kv head
    ``h // (Nq // Nkv)``. K/V are never repeated in memory. v's head dim may differ from q/k's (MLA).

    Masks (i = query position, j = key position within one sequence, ``delta = Skv - Sq``):
      - ``sparse_mode=0``: ``atten_mask`` if given (bool, True = masked out, broadcastable to
        [B, Nq, Sq, Skv]; for TND a 2-d mask of at least [longest Sq, longest Skv] whose
        top-left corner applies to each sequence), and keys with
        ``-pre_tokens <= j - i <= next_tokens`` only. Finite pre/next tokens without
        ``atten_mask`` are an error (use mode 4), as on NPU.
      - ``1``: ``atten_mask`` required, used as is (pre/next tokens ignored, as in modes 2 and 3).
      - ``2``: causal aligned top-left, ``j <= i``.
      - ``3``: causal aligned bottom-right, ``j <= i + delta``.
      - ``4``: band aligned bottom-right, ``-pre_tokens <= j - i - delta <= next_tokens``
        (a sliding window of W keys: ``pre_tokens=W-1, next_tokens=0``).
      Modes 2-4 build their mask themselves; passing ``atten_mask`` with them is an error.
    A row whose keys are all masked has ``out`` 0, ``softmax_lse`` ``-inf`` and zero gradients.
    ``alibi_slopes`` [Nq] or [B, Nq] (TND: B = number of sequences; floating, used in float32)
    adds ``-slope * |i + delta - j|`` after scaling; it gets no gradient.
    ``scale`` defaults to ``D ** -0.5``. ``dropout_p`` drops attention probabilities with inverted
    scaling by ``1 / (1 - dropout_p)`` (``softmax_lse`` is unaffected); the randomness comes from
    one draw of torch's default generator for q's device, so ``torch.manual_seed`` reproduces it,
    and backward replays the same mask exactly. The mask pattern itself is backend-specific.

    Returns ``out`` in q's layout and dtype (head dim of v) and ``softmax_lse`` float32 (float64
    for float64 inputs), the natural-log log-sum-exp of each query row's scaled, biased, masked
    scores: [B, Nq, Sq] (TND: [T, Nq]); ``-inf`` for a row with no visible key.
    Differentiable in q, k and v, through ``out`` and ``softmax_lse`` (ring attention
    backpropagates through the lse of each step).
    """
    args.check_layout(layout)
    for name, t in (("q", q), ("k", k), ("v", v)):
        args.check_rank(name, t, layout)
    args.check_tensors(q, k, v)
    n_q, n_kv, _, _ = args.heads_and_dims(q, k, v, layout, num_heads)
    args.check_heads(n_q, n_kv)
    batch, s_q, s_kv = args.check_batch_seq(q, k, v, layout)
    args.check_int("pre_tokens", pre_tokens)
    args.check_int("next_tokens", next_tokens)
    args.check_mode(sparse_mode, atten_mask, pre_tokens, next_tokens, NO_LIMIT)
    args.check_scale_dropout(scale, dropout_p)
    if layout == "TND":
        actual_seq_qlen, actual_seq_kvlen, mask_shape = args.tnd_lengths(actual_seq_qlen, actual_seq_kvlen, s_q, s_kv)
        batch = len(actual_seq_qlen)
    else:
        for name, value in (("actual_seq_qlen", actual_seq_qlen), ("actual_seq_kvlen", actual_seq_kvlen)):
            if value is not None:
                raise ValueError(f"{name} is only for layout 'TND', not {layout!r}; leave it None")
        mask_shape = (batch, n_q, s_q, s_kv)
    args.check_mask(atten_mask, q, layout, mask_shape)
    args.check_alibi(alibi_slopes, q, batch, n_q)
    return call(
        "flash_attention", q, backend, q, k, v, layout, sparse_mode, pre_tokens, next_tokens,
        atten_mask=atten_mask, scale=scale, dropout_p=dropout_p, actual_seq_qlen=actual_seq_qlen,
        actual_seq_kvlen=actual_seq_kvlen, num_heads=num_heads, alibi_slopes=alibi_slopes,
    )


def ring_attention_update(
    prev_out: torch.Tensor,
    prev_lse: torch.Tensor,
    cur_out: torch.Tensor,
    cur_lse: torch.Tensor,
    layout: str = "SBH",
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets (one ring-CP step).

    ``lse = logaddexp(prev_lse, cur_lse)``; ``out = prev_out * exp(prev_lse - lse) +
    cur_out * exp(cur_lse - lse)``, accumulated in float32 (float64 if any input is float64).
    Outputs and lse use :func:`flash_attention`'s shapes for ``layout`` (lse [B, N, S], or
    [T, N] for TND; N is read from the lse). Rows where both lse are ``-inf`` give out 0,
    lse ``-inf``.
    Returns ``(out, lse)``: out in ``prev_out``'s dtype (keep the running result in float32 to
    avoid rounding at each step; ``cur_out`` may have another floating dtype), lse float32
    (float64 if any input is float64). Differentiable, with finite gradients on ``-inf`` rows.
    """
    args.check_ring(prev_out, prev_lse, cur_out, cur_lse, layout)
    return call("ring_attention_update", prev_out, backend, prev_out, prev_lse, cur_out, cur_lse, layout)
