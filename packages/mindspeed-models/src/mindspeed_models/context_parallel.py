"""Context parallelism in a built model: core attention through mindspeed-parallel's CP
algorithms and rotary angles for the positions this rank holds.

megatron-core's own CP runs inside TransformerEngine's attention and assumes megatron's zig-zag
split everywhere; here the algorithm (``--context-parallel-algo``) decides the split. After
:func:`enable_context_parallel`, every :class:`~mindspeed_models.attention.FlashAttention` calls
``mindspeed_parallel.cp.runtime.attention`` and every rotary module returns the angles of
``mindspeed_parallel.cp.runtime.positions`` (the data pipeline splits its batches with the same
positions), and megatron's MTP rolls follow the same positions (:func:`roll_on_layout`, which
also makes the MTP loss the whole sequence's token mean). Not covered yet, and refused: packed
(THD) sequences, attention dropout, sliding windows.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding
from megatron.core.models.gpt import gpt_model as _gpt_model
from megatron.core.transformer import multi_token_prediction as _mtp_module
from megatron.core.transformer.multi_token_prediction import roll_tensor as _ROLL

from mindspeed_parallel.cp import runtime
from mindspeed_parallel.cp.config import CPConfig

__all__ = ["ContextParallel", "enable_context_parallel", "roll", "roll_on_layout"]


class ContextParallel:
    """One model's CP algorithm: ``config``, this rank's ``groups`` and ``rank`` in the cp group.

    ``attend(q, k, v, causal, attention_mask, scale)`` runs the algorithm on local [S/cp, B, N, D]
    tensors; ``positions(seq_len, device)`` are the global positions of the local tokens;
    ``causal_mask(seq_len, device)`` is the explicit [S, S] causal mask that
    ``cp_attention_mask_type general`` hands to the algorithm (on the CPU with
    ``attention_mask_on_cpu``), built once per length. The adaptive algorithms plan the causal
    mask of each sequence length (``adaptive_cp_*`` options; with ``manually_set_mask_list``,
    ``mask_lengths`` are planned up front).
    """

    def __init__(self, config: CPConfig, groups: runtime.CPGroups, rank: int, mask_lengths: tuple[int, ...] = ()) -> None:
        self.config, self.groups, self.rank = config, groups, rank
        self._masks: dict[tuple[int, str], torch.Tensor] = {}
        masks = [self.causal_mask(n, "cpu") for n in mask_lengths] if config.adaptive_manually_set_mask_list else None
        self._planner = runtime.make_planner(config, mask_list=masks)
        self._plans: dict[int, object] = {}

    def attend(self, q, k, v, causal: bool, attention_mask, scale) -> torch.Tensor:
        seq_len = q.shape[0] * self.config.size
        if causal and self.config.mask_type == "general":
            attention_mask, causal = self.causal_mask(seq_len, q.device), False
        return runtime.attention(self.config, self.groups, q, k, v, causal=causal, attention_mask=attention_mask,
                                 scale=scale, plan=self.plan(seq_len))  # fmt: skip

    def positions(self, seq_len: int, device=None) -> torch.Tensor:
        return self.positions_of(seq_len, self.rank, device)

    def positions_of(self, seq_len: int, rank: int, device=None) -> torch.Tensor:
        """The global positions cp rank ``rank`` holds."""
        return runtime.positions(self.config, seq_len, rank, device, plan=self.plan(seq_len))

    def plan(self, seq_len: int):
        """The adaptive plan of the causal mask of ``seq_len`` tokens (None for other algorithms)."""
        if self._planner is None:
            return None
        if self.config.adaptive_dynamic_attn_mask:  # no caching: the planner plans every call
            return self._planner.plan(self.causal_mask(seq_len, "cpu"))
        if seq_len not in self._plans:  # the training mask of a length is always the causal one
            self._plans[seq_len] = self._planner.plan(self.causal_mask(seq_len, "cpu"))
        return self._plans[seq_len]

    def causal_mask(self, seq_len: int, device) -> torch.Tensor:
        device = torch.device("cpu") if self.config.mask_on_cpu else torch.device(device)
        key = (seq_len, str(device))
        if key not in self._masks:
            self._masks[key] = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu_(1)
        return self._masks[key]


def enable_context_parallel(model: torch.nn.Module, cp: ContextParallel) -> None:
    """Route ``model``'s core attention and rotary angles through ``cp`` (in place, idempotent).

    Raises ``ValueError`` for what CP does not cover yet (MTP with a non-zig-zag split)."""
    from mindspeed_models.attention import FlashAttention
    from mindspeed_models.rope import RotaryAngles

    model.context_parallel = cp  # read by roll() (fused-loss MTP)
    if getattr(model.config, "mtp_num_layers", None):
        # megatron's MTP rolls labels / loss mask (gpt_model) and input ids / positions
        # (multi_token_prediction) with a module-level roll_tensor that assumes its zig-zag split.
        _gpt_model.roll_tensor = _mtp_module.roll_tensor = functools.partial(roll_on_layout, cp)
    for module in model.modules():
        if isinstance(module, FlashAttention):
            module.context_parallel = cp
        elif isinstance(module, (RotaryAngles, RotaryEmbedding, YarnRotaryEmbedding)):
            _slice_rotary(module, cp)


def roll_on_layout(cp: ContextParallel | None, tensor, shifts=-1, dims=-1, cp_group=None, packed_seq_params=None):
    """megatron's MTP ``roll_tensor`` (``tensor`` [..., S/cp] shifted one position left along the
    sequence, the last global position zeroed; returns it with its sum) for any CP layout.

    The local parts are all-gathered into the global sequence (labels, masks and ids: a few
    integers per token), rolled, and this rank's positions taken back. The sum (megatron's token
    count for the MTP loss) is the whole sequence's / cp size: megatron divides each rank's MTP
    loss sum by it and averages the gradients over the cp ranks (its MTP loss scale has no cp
    factor), so the MTP loss is the sequence's token mean in the gradient and in the log, where
    a per-rank count would give a mean of per-rank means. Without CP (or for packed sequences,
    refused under CP) this is megatron's roll."""
    if cp is None or cp_group is None or cp_group.size() == 1 or packed_seq_params is not None:
        return _ROLL(tensor, shifts=shifts, dims=dims, cp_group=cp_group, packed_seq_params=packed_seq_params)
    if shifts != -1 or dims not in (-1, tensor.dim() - 1):
        raise ValueError(f"roll_on_layout: only megatron MTP's roll (shifts=-1, dims=-1), got shifts={shifts}, dims={dims}")
    size, local = cp_group.size(), tensor.contiguous()
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local, group=cp_group)
    seq = local.shape[-1] * size
    full = local.new_zeros(*local.shape[:-1], seq)
    for rank, part in enumerate(parts):
        full[..., cp.positions_of(seq, rank, local.device)] = part
    rolled = torch.roll(full, shifts=-1, dims=-1)
    rolled[..., -1] = 0
    return rolled[..., cp.positions(seq, local.device)], rolled.sum() / size


def roll(model, tensor, shifts=-1, dims=-1, cp_group=None, packed_seq_params=None):
    """:func:`roll_on_layout` with ``model``'s context parallelism (megatron's roll without it)."""
    cp = getattr(model, "context_parallel", None)
    return roll_on_layout(cp, tensor, shifts=shifts, dims=dims, cp_group=cp_group, packed_seq_params=packed_seq_params)


def _slice_rotary(module: torch.nn.Module, cp: ContextParallel) -> None:
    """Make ``module.forward(max_seq_len, offset, packed_seq, cp_group)`` return the angles of this
    rank's positions: the full table (megatron passes the global length under CP) indexed by
    ``cp.positions`` instead of megatron's zig-zag slice."""
    if getattr(module, "_cp_sliced", False):
        return
    full = module.forward

    @functools.wraps(full)
    def forward(max_seq_len, offset=0, packed_seq=False, cp_group=None):
        if packed_seq:
            raise ValueError("packed (THD) sequences under context parallelism are not implemented yet")
        # packed_seq=True is how these modules skip their own (zig-zag) cp slice: the full table
        out = full(max_seq_len, offset, True, None)
        emb, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        emb = emb[cp.positions(max_seq_len, emb.device)]
        return (emb, *rest) if rest is not None else emb

    module.forward = forward
    module._cp_sliced = True
