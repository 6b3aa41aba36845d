"""megatron-core's ``SelfAttention`` with q/k rotated by :func:`mindspeed_kernels.ops.rotary_pos_emb`.

The kernels' op is the fused rotary kernel where the device has one (``npu_rotary_mul`` on
Ascend) and computes the rotation in float32 for half-precision inputs. Everything else
(projections, q/k norms, core attention, output projection) is megatron's, so parameters and
checkpoints are unchanged. Cases the kernel path does not cover keep megatron's own
``apply_rotary_pos_emb``: inference with a KV cache, flash decoding, interleaved rotary layouts,
YaRN's megatron-side mscale (our GQA models fold it into the softmax scale instead) and packed
sequences under context parallelism.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor_from_config
from megatron.core.transformer.attention import SelfAttention

from mindspeed_kernels import ops

__all__ = ["KernelRopeSelfAttention"]


class KernelRopeSelfAttention(SelfAttention):
    """``SelfAttention`` (same constructor, forward and parameters) rotating q and k through the kernels.

    ``rotary_pos_emb``: megatron's angles [S, 1, 1, R] float32 (rotate-half layout, R <= head dim;
    a (q, k) pair of them is accepted too). With packed sequences (``packed_seq_params`` THD,
    context parallel size 1) positions restart at 0 at each ``cu_seqlens`` boundary, as megatron's.
    """

    _kernel_rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None, rotary_pos_emb=None,
                rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                packed_seq_params=None, sequence_len_offset=None, *, inference_params=None):  # fmt: skip
        if self._kernel_path(rotary_pos_emb, inference_context or inference_params, packed_seq_params):
            pair = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb, rotary_pos_emb)
            self._kernel_rope = (*pair, _thd_starts(packed_seq_params))
            rotary_pos_emb = None  # megatron must not rotate a second time
        try:
            return super().forward(
                hidden_states, attention_mask, key_value_states, inference_context, rotary_pos_emb, rotary_pos_cos,
                rotary_pos_sin, rotary_pos_cos_sin, attention_bias, packed_seq_params, sequence_len_offset,
                inference_params=inference_params,
            )  # fmt: skip
        finally:
            self._kernel_rope = None

    def _kernel_path(self, rotary_pos_emb, inference_context, packed_seq_params) -> bool:
        if rotary_pos_emb is None or inference_context is not None or self.config.flash_decode:
            return False
        if self.config.rotary_interleaved or _yarn_get_concentration_factor_from_config(self.config) != 1.0:
            return False
        if packed_seq_params is not None and (packed_seq_params.qkv_format != "thd" or self.pg_collection.cp.size() > 1):
            return False
        return not isinstance(rotary_pos_emb, tuple) or all(t is not None for t in rotary_pos_emb)

    def get_query_key_value_tensors(self, *args, **kwargs):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        if self._kernel_rope is None:
            return out
        q_angles, k_angles, starts = self._kernel_rope
        q_tables = _tables(q_angles, out[0].shape[0], starts)
        shared = k_angles is q_angles and out[1].shape[0] == out[0].shape[0]  # the usual case: one table for both
        k_tables = q_tables if shared else _tables(k_angles, out[1].shape[0], starts)
        return (ops.rotary_pos_emb(out[0], *q_tables), ops.rotary_pos_emb(out[1], *k_tables), *out[2:])


def _thd_starts(packed_seq_params) -> torch.Tensor | None:
    """Cumulative sequence starts [n + 1] of packed (THD) tokens, padded ones when given; None unpacked."""
    if packed_seq_params is None:
        return None
    padded = packed_seq_params.cu_seqlens_q_padded
    return packed_seq_params.cu_seqlens_q if padded is None else padded


def _tables(angles: torch.Tensor, seq: int, starts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, 1, 1, R] for ``seq`` rows of ``angles`` [>= S, 1, 1, R] (row s at position s, or per packed
    sequence)."""
    if starts is None:
        return _cos_sin(angles, seq)
    starts = starts.to(angles.device).long()
    lengths = starts[1:] - starts[:-1]
    positions = torch.arange(seq, device=angles.device) - torch.repeat_interleave(starts[:-1], lengths)[:seq]
    angles = angles[positions]
    return torch.cos(angles), torch.sin(angles)


# (angles, rows, inference mode, cos, sin) of the last unpacked call. GPTModel computes the angles once
# per forward and hands the same tensor to every layer (q and k alike; megatron's RotaryEmbedding also
# returns it from an lru_cache across steps): cos/sin are computed once per forward instead of twice per
# layer (small ops whose Python cost shows on CPU). The strong reference makes the identity test safe.
_last_cos_sin: list[tuple] = []


def _cos_sin(angles: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``angles[:seq]`` (constant angles: reused while the same tensor comes back)."""
    # inference-mode tensors cannot be saved for a later training backward: the mode is part of the key
    key = (seq, torch.is_inference_mode_enabled())
    if not angles.requires_grad and _last_cos_sin and _last_cos_sin[0][0] is angles and _last_cos_sin[0][1:3] == key:
        return _last_cos_sin[0][3:]
    tables = torch.cos(angles[:seq]), torch.sin(angles[:seq])
    if not angles.requires_grad:  # learnt angles: autograd must see the cos/sin of every call
        _last_cos_sin[:] = [(angles, *key, *tables)]
    return tables
