"""Core attention for megatron-core layers, computed by :func:`mindspeed_kernels.ops.flash_attention`.

A drop-in for megatron's ``DotProductAttention`` in a layer spec (same constructor and forward
interface), but O(sequence) memory, GQA without repeating K/V, packed (THD) sequences and
sliding windows.
"""

from __future__ import annotations

import math

import torch
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

from mindspeed_kernels import ops

__all__ = ["FlashAttention"]

NO_LIMIT = 2**31 - 1  # flash_attention's "unbounded" pre/next tokens
_CAUSAL = {
    AttnMaskType.causal: "top_left",
    AttnMaskType.padding_causal: "top_left",
    AttnMaskType.causal_bottom_right: "bottom_right",
}
_CAUSAL_MODE = {None: 0, "top_left": 2, "bottom_right": 3}  # flash_attention sparse_mode per alignment


class FlashAttention(MegatronModule):
    """megatron core attention through mindspeed_kernels' flash attention.

    ``forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
    packed_seq_params=None)``: query [Sq, B, Nq, D], key/value [Skv, B, Nkv, D] (Nkv divides
    Nq) -> [Sq, B, Nq * Dv]; with ``packed_seq_params`` (qkv_format "thd") [T, N, D] tensors
    -> [T, Nq * Dv], each sequence attending only within itself.

    Masks: ``causal``/``padding_causal`` hide keys after the query (top-left aligned, as
    megatron's DotProductAttention), ``causal_bottom_right`` aligns the diagonal to the last key;
    ``attention_mask`` (bool, True = hidden, broadcastable to [B, Nq, Sq, Skv]) hides more keys
    on top of that (a megatron mask already contains causality, so this agrees with
    DotProductAttention, which uses the given mask instead). ``padding``/``arbitrary`` use the
    mask alone; ``no_mask`` uses none (megatron keeps passing the prompt's mask in decode steps,
    where it no longer applies, as TransformerEngine does). Layers selected by
    ``config.window_size``/``window_attn_skip_freq`` see only keys ``j`` with
    ``-left <= j - i - (Skv - Sq) <= right`` (``window_size = (left, right)``, -1 = unbounded;
    aligned to the last key and replacing the causal mask, as DotProductAttention does; (W - 1, 0)
    is a causal window of W keys).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        # Set by mindspeed_models.context_parallel.enable_context_parallel when context_parallel_size > 1.
        self.context_parallel = None
        if config.softmax_type != "vanilla":
            raise ValueError(f"FlashAttention: softmax_type={config.softmax_type!r} is not implemented; use 'vanilla'")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        # apply_query_key_layer_scaling divides the scale by layer_number and multiplies the fp32
        # softmax input back by it in DotProductAttention: no net effect, so it is not replayed.
        self.softmax_scale = softmax_scale
        self.window = None
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, self.layer_number):
            left, right = config.window_size
            self.window = (NO_LIMIT if left < 0 else left, NO_LIMIT if right < 0 else right)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("FlashAttention: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        scale = self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(query.shape[-1])
        dropout = self.dropout_p if self.training else 0.0
        if dropout > 0.0 and not self.config.sequence_parallel:
            # Same RNG discipline as DotProductAttention: TP ranks hold different heads, so each
            # draws its dropout mask from the model-parallel stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self._attend(query, key, value, attention_mask, mask_type, scale, dropout, packed_seq_params)
        return self._attend(query, key, value, attention_mask, mask_type, scale, dropout, packed_seq_params)

    def _attend(self, q, k, v, attention_mask, mask_type, scale, dropout, packed) -> torch.Tensor:
        if self.config.context_parallel_size > 1:
            return self._attend_cp(q, k, v, attention_mask, mask_type, scale, dropout, packed)
        if packed is not None:
            return self._attend_packed(q, k, v, attention_mask, mask_type, scale, dropout, packed)
        if q.dim() != 4:
            raise ValueError(f"FlashAttention: query has shape {tuple(q.shape)}; expected [S, B, N, D]")
        heads = q.shape[2]
        sq, sk = q.shape[0], k.shape[0]
        mode, pre, nxt, mask = self._mask_args(attention_mask, mask_type, sq, sk, q.device)
        out, _ = ops.flash_attention(
            q.reshape(sq, q.shape[1], -1),
            k.reshape(sk, k.shape[1], -1),
            v.reshape(sk, v.shape[1], -1),
            "SBH",
            mode,
            pre,
            nxt,
            atten_mask=mask,
            scale=scale,
            dropout_p=dropout,
            num_heads=heads,
        )
        return out

    def _attend_cp(self, q, k, v, attention_mask, mask_type, scale, dropout, packed) -> torch.Tensor:
        """This rank's [S/cp, B, N, D] tokens (or, with ``packed`` from ``ContextParallel.packed_params``,
        its packed row [T/cp, 1, N, D]) through the job's context-parallel algorithm."""
        cp = self.context_parallel
        if cp is None:
            raise ValueError("FlashAttention: context_parallel_size > 1 needs "
                             "mindspeed_models.context_parallel.enable_context_parallel(model, ...) after building")  # fmt: skip
        unsupported = {"attention dropout": dropout > 0.0, "sliding-window attention": self.window is not None,
                       "an attention_mask": attention_mask is not None and mask_type != AttnMaskType.no_mask}  # fmt: skip
        for what, present in unsupported.items():
            if present:
                raise ValueError(f"FlashAttention: {what} under context parallelism is not implemented yet")
        if packed is not None and q.dim() == 3:  # MLA squeezed the batch axis of the packed row
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        causal = _CAUSAL.get(mask_type) is not None
        out = cp.attend(q, k, v, causal, None, scale, packed)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def _mask_args(self, attention_mask, mask_type, sq: int, sk: int, device):
        """(sparse_mode, pre_tokens, next_tokens, atten_mask) for flash_attention."""
        causal = _CAUSAL.get(mask_type)
        user = None if mask_type == AttnMaskType.no_mask else attention_mask
        if user is not None and user.dtype != torch.bool:
            raise TypeError(f"FlashAttention: attention_mask must be bool (True = hidden), got {user.dtype}")
        if user is None:
            # The kernel builds these masks itself: mode 4 is the bottom-right band, 2/3 causal.
            if self.window is not None:
                return 4, self.window[0], self.window[1], None
            return _CAUSAL_MODE[causal], NO_LIMIT, NO_LIMIT, None
        return 1, NO_LIMIT, NO_LIMIT, user | _structural_mask(sq, sk, causal, self.window, device)

    def _attend_packed(self, q, k, v, attention_mask, mask_type, scale, dropout, packed) -> torch.Tensor:
        if packed.qkv_format != "thd":
            raise ValueError(f"FlashAttention: packed_seq_params.qkv_format={packed.qkv_format!r}; only 'thd' is supported")
        if attention_mask is not None and mask_type != AttnMaskType.no_mask:
            raise ValueError("FlashAttention: attention_mask cannot be combined with packed sequences; pass None")
        # Padded offsets (when given) describe where each sequence sits in the packed tensor; the
        # pad tokens after a sequence then form its tail, invisible to its real tokens under causality.
        cu_q = packed.cu_seqlens_q_padded if packed.cu_seqlens_q_padded is not None else packed.cu_seqlens_q
        cu_kv = packed.cu_seqlens_kv_padded if packed.cu_seqlens_kv_padded is not None else packed.cu_seqlens_kv
        causal = _CAUSAL.get(mask_type)
        if self.window is not None:
            mode, pre, nxt = 4, self.window[0], self.window[1]
        else:
            mode, pre, nxt = _CAUSAL_MODE[causal], NO_LIMIT, NO_LIMIT
        out, _ = ops.flash_attention(
            q,
            k,
            v,
            "TND",
            mode,
            pre,
            nxt,
            scale=scale,
            dropout_p=dropout,
            actual_seq_qlen=cu_q[1:],
            actual_seq_kvlen=cu_kv[1:],
        )
        return out.reshape(out.shape[0], -1)


def _structural_mask(sq: int, sk: int, causal: str | None, window, device) -> torch.Tensor:
    """[Sq, Sk] bool, True = hidden: the (left, right) band aligned to the last key, else causality."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    if window is not None:
        offset = j - i - (sk - sq)
        return (offset < -window[0]) | (offset > window[1])
    offset = j - i - (sk - sq if causal == "bottom_right" else 0)
    if causal is None:
        return torch.zeros(sq, sk, dtype=torch.bool, device=device)
    return offset > 0
