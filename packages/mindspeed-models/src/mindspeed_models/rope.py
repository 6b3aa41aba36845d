"""Rotary position angles for megatron-core's GPTModel, with Hugging Face's frequency tables.

GPTModel asks its ``rotary_pos_emb`` module for the rotation angles [S, 1, 1, dim] and
megatron's attention rotates q and k with them (rotate-half, cos/sin computed in float32, as
transformers does). This module replaces megatron's RotaryEmbedding so the inverse frequencies
come from :mod:`mindspeed_kernels.rope` (plain, Llama-3 or YaRN, exactly as the HF config says);
YaRN's cos/sin factor is applied through the softmax scale (see :mod:`mindspeed_models.config`).
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding as _MegatronRotary

from mindspeed_kernels import modules
from mindspeed_models.config import RopeSettings

__all__ = ["RotaryAngles"]


class RotaryAngles(torch.nn.Module):
    """Drop-in for megatron's ``RotaryEmbedding`` inside GPTModel.

    ``forward(max_seq_len, offset=0, packed_seq=False, cp_group=None)`` -> float32 angles
    [max_seq_len, 1, 1, dim] for positions ``offset ..``, laid out ``cat(freqs, freqs)``
    (rotate-half); under context parallelism (not packed) this rank's slice of them.
    The frequencies live in a non-persistent float32 buffer that survives ``.to(bfloat16)``.
    """

    def __init__(self, rope: RopeSettings, *, cp_group=None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.settings = rope
        # mindspeed_kernels' RotaryEmbedding keeps inv_freq exact across moves and casts.
        self.table = modules.RotaryEmbedding(rope.dim, rope.base, rope.scaling, device=device)
        self.cp_group = cp_group

    @property
    def inv_freq(self) -> torch.Tensor:
        """[dim // 2] float32 radians per position."""
        return self.table.inv_freq

    def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        """[max_seq_len, dim // 2] float32 angles ``position * inv_freq``."""
        inv_freq = self.table.inv_freq
        positions = torch.arange(max_seq_len, device=inv_freq.device, dtype=torch.float32) + offset
        return torch.outer(positions, inv_freq)

    def get_cos_sin(self, max_seq_len: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the non-repeated angles (megatron's flash-decode path)."""
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        return torch.cos(freqs), torch.sin(freqs)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
        group = cp_group if cp_group is not None else self.cp_group
        if group is not None and group.size() > 1 and not packed_seq:
            emb = get_pos_emb_on_this_cp_rank(emb, 0, group)
        return emb

    # The sequence length GPTModel asks angles for depends only on its arguments.
    get_rotary_seq_len = _MegatronRotary.get_rotary_seq_len
