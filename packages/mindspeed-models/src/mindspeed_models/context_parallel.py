"""Context parallelism in a built model: core attention through mindspeed-parallel's CP
algorithms and rotary angles for the positions this rank holds.

megatron-core's own CP runs inside TransformerEngine's attention and assumes megatron's zig-zag
split everywhere; here the algorithm (``--context-parallel-algo``) decides the split. After
:func:`enable_context_parallel`, every :class:`~mindspeed_models.attention.FlashAttention` calls
``mindspeed_parallel.cp.runtime.attention`` and every rotary module returns the angles of
``mindspeed_parallel.cp.runtime.positions`` (the data pipeline splits its batches with the same
positions), and megatron's MTP rolls follow the same positions (:func:`roll_on_layout`, which
also makes the MTP loss the whole sequence's token mean).

Packed sequences (ring, ulysses and hybrid): for ring and hybrid every sequence is padded at its
tail to :attr:`ContextParallel.packed_multiple` tokens and split on its own with the algorithm's
layout (``mindspeed_parallel.cp.data.packed_indices``); ulysses splits the unpadded packed stream
contiguously (its all-to-all hands every rank the whole stream). The model takes the local tokens as one
``[T/cp, 1]`` row with :meth:`ContextParallel.packed_params`. That PackedSeqParams is
``qkv_format="sbhd"`` on purpose: megatron then rotates q/k row by row with the angles the rotary
modules return here (each local token's position inside its sequence, whatever the layout)
instead of its own zig-zag-only THD rotary, and our attention hands the algorithm TND tensors with
this rank's cumulative sequence ends, so no token attends across sequences. Not covered, and
refused: the adaptive algorithms with packed sequences, attention dropout, sliding windows.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.distributed as dist
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding
from megatron.core.models.gpt import gpt_model as _gpt_model
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import multi_token_prediction as _mtp_module
from megatron.core.transformer.multi_latent_attention import MultiLatentAttention
from megatron.core.transformer.multi_token_prediction import roll_tensor as _ROLL

from mindspeed_parallel.cp import data, runtime
from mindspeed_parallel.cp.config import HYBRID, RING, ULYSSES, CPConfig
from mindspeed_parallel.cp.hybrid import hybrid_attention, hybrid_packed_indices
from mindspeed_parallel.cp.ring import ring_attention
from mindspeed_parallel.cp.ulysses import local_attention, ulysses_attention

__all__ = ["PACKED_ALGORITHMS", "PACKED_FORMAT", "ContextParallel", "enable_context_parallel", "roll", "roll_on_layout"]

# The qkv_format of the PackedSeqParams the model gets for packed sequences under CP (see the module docstring).
PACKED_FORMAT = "sbhd"
# The algorithms that take packed (TND) sequences; the adaptive ones plan a mask and have no TND form.
PACKED_ALGORITHMS = (RING, ULYSSES, HYBRID)


class ContextParallel:
    """One model's CP algorithm: ``config``, this rank's ``groups`` and ``rank`` in the cp group.

    ``attend(q, k, v, causal, attention_mask, scale)`` runs the algorithm on local [S/cp, B, N, D]
    tensors; ``positions(seq_len, device)`` are the global positions of the local tokens;
    ``causal_mask(seq_len, device)`` is the explicit [S, S] causal mask that
    ``cp_attention_mask_type general`` hands to the algorithm (on the CPU with
    ``attention_mask_on_cpu``), built once per length. The adaptive algorithms plan the causal
    mask of each sequence length (``adaptive_cp_*`` options; with ``manually_set_mask_list``,
    ``mask_lengths`` are planned up front). Packed sequences: :attr:`packed_multiple`,
    :meth:`packed_rows_of` and :meth:`packed_params`.
    """

    def __init__(self, config: CPConfig, groups: runtime.CPGroups, rank: int, mask_lengths: tuple[int, ...] = ()) -> None:
        self.config, self.groups, self.rank = config, groups, rank
        self._masks: dict[tuple[int, str], torch.Tensor] = {}
        masks = [self.causal_mask(n, "cpu") for n in mask_lengths] if config.adaptive_manually_set_mask_list else None
        self._planner = runtime.make_planner(config, mask_list=masks)
        self._plans: dict[int, object] = {}
        self._positions: dict[tuple[int, int, str], torch.Tensor] = {}
        self._rows: tuple[tuple[int, ...], dict[int, tuple[torch.Tensor, list[int]]]] = ((), {})
        # In-sequence positions of the local tokens of the last packed batch the model was called
        # with (None: not packed); read by the rotary modules, also when a layer is recomputed.
        self.rope_positions: torch.Tensor | None = None

    def attend(self, q, k, v, causal: bool, attention_mask, scale, packed: PackedSeqParams | None = None) -> torch.Tensor:
        """The algorithm on this rank's tokens: [S/cp, B, N, D] tensors, or with ``packed`` (from
        :meth:`packed_params`) one packed row [T/cp, 1, N, D] whose sequences stay apart."""
        if packed is not None:
            return self._attend_packed(q, k, v, causal, attention_mask, scale, packed)
        seq_len = q.shape[0] * self.config.size
        if causal and self.config.mask_type == "general":
            attention_mask, causal = self.causal_mask(seq_len, q.device), False
        return runtime.attention(self.config, self.groups, q, k, v, causal=causal, attention_mask=attention_mask,
                                 scale=scale, plan=self.plan(seq_len))  # fmt: skip

    def _attend_packed(self, q, k, v, causal: bool, attention_mask, scale, packed: PackedSeqParams) -> torch.Tensor:
        """q [T/cp, 1, Nq, D], k/v [T/cp, 1, Nkv, D|Dv] (one packed row) -> [T/cp, 1, Nq, Dv]."""
        if attention_mask is not None or q.shape[1] != 1:
            raise ValueError(f"packed sequences under CP take one [T/cp, 1, N, D] row and no attention_mask, got q "
                             f"{tuple(q.shape)} and a mask: {attention_mask is not None}")  # fmt: skip
        _, cu = self.packed_rows_of(_padded_ends(packed)[1:].tolist(), self.rank)
        attend = _PACKED_ATTENTION[self.config.algo]
        out = attend(self.config, self.groups, q.squeeze(1), k.squeeze(1), v.squeeze(1), causal, scale, cu)
        return out.unsqueeze(1)

    def positions(self, seq_len: int, device=None) -> torch.Tensor:
        return self.positions_of(seq_len, self.rank, device)

    def positions_of(self, seq_len: int, rank: int, device=None) -> torch.Tensor:
        """The global positions cp rank ``rank`` holds (computed once per length, rank and device:
        every rotary module and MTP roll of every microbatch asks)."""
        if self.config.adaptive_dynamic_attn_mask:  # the plan may change with every call
            return runtime.positions(self.config, seq_len, rank, device, plan=self.plan(seq_len))
        key = (seq_len, rank, str(torch.device(device) if device is not None else "cpu"))
        if key not in self._positions:
            self._positions[key] = runtime.positions(self.config, seq_len, rank, device, plan=self.plan(seq_len))
        return self._positions[key]

    @property
    def packed_multiple(self) -> int:
        """Each packed sequence is padded to a multiple of this many tokens: 1 for ulysses (no
        padding: the packed stream is split contiguously, only its total must divide by cp, and the
        all-to-all gives each rank the whole stream for its heads), 2 * cp for ring (two zig-zag
        chunks of every sequence per rank), lcm(2 * ring degree, cp) for hybrid (zig-zag over the
        ring ranks, then contiguous over the ulysses ranks)."""
        self._check_packed()
        if self.config.algo == ULYSSES:
            return 1
        return math.lcm(2 * self.config.ring_degree, self.config.size)

    def packed_rows_of(self, padded_cu, rank: int, device=None) -> tuple[torch.Tensor, list[int]]:
        """Rows of a packed batch (``padded_cu``: cumulative ends of its sequences, each a multiple
        of :attr:`packed_multiple`, without the leading 0) that cp rank ``rank`` holds, in its local
        order (int64 [T / cp]), and the cumulative ends its attention takes: each sequence's length / cp
        for ring and hybrid, the global ends for ulysses (its ranks hold contiguous slices of the stream)."""
        self._check_packed()
        key = tuple(int(end) for end in padded_cu)
        if self._rows[0] != key:  # one packed batch at a time: cache the last one's rows for every layer
            self._rows = (key, {})
        cache = self._rows[1]
        if rank not in cache:
            if self.config.algo == HYBRID:
                rows, local = hybrid_packed_indices(list(key), self.config.ulysses_degree, self.config.ring_degree, rank)
            elif self.config.algo == ULYSSES:
                rows, local = data.contiguous_indices(key[-1], self.config.size, rank), list(key)
            else:
                rows, local = data.packed_indices(list(key), self.config.size, rank, zigzag=True)
            cache[rank] = (rows, local)
        rows, local = cache[rank]
        return rows.to(device), list(local)

    def packed_params(self, padded_cu, device=None) -> PackedSeqParams:
        """What the model takes with a packed batch's local tokens ([1, T / cp], split by
        :meth:`packed_rows_of`): qkv_format :data:`PACKED_FORMAT`, ``cu_seqlens_q/kv`` the global
        padded cumulative ends (int32, with the leading 0), max_seqlen the longest padded sequence."""
        self._check_packed()
        ends = [int(end) for end in padded_cu]
        bad = [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True) if (b - a) % self.packed_multiple or b <= a]
        if bad:
            raise ValueError(f"padded_cu: sequence lengths {bad} are not positive multiples of {self.packed_multiple}; "
                             "pad them with mindspeed_parallel.cp.data.pad_packed")  # fmt: skip
        cu = torch.tensor([0, *ends], dtype=torch.int32, device=device)
        longest = int((cu[1:] - cu[:-1]).max())
        return PackedSeqParams(qkv_format=PACKED_FORMAT, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                               max_seqlen_kv=longest)  # fmt: skip

    def bind(self, packed: PackedSeqParams | None) -> None:
        """Set :attr:`rope_positions` for a model call with ``packed`` (None: not packed)."""
        if packed is None:
            self.rope_positions = None
            return
        cu = _padded_ends(packed).long()
        rows, _ = self.packed_rows_of(cu[1:].tolist(), self.rank, cu.device)
        # position of each local token inside its sequence (as megatron's THD rotary restarts them)
        self.rope_positions = rows - cu[torch.searchsorted(cu[1:], rows, right=True)]

    def _check_packed(self) -> None:
        if self.config.algo not in PACKED_ALGORITHMS:
            raise ValueError(f"context_parallel_algo={self.config.algo}: packed sequences need one of "
                             f"{', '.join(PACKED_ALGORITHMS)}")  # fmt: skip
        if self.config.mask_type != "causal":
            raise ValueError("cp_attention_mask_type=general with packed sequences: cu_seqlens keep the sequences apart "
                             "under the causal mask; use cp_attention_mask_type causal")  # fmt: skip

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


def _padded_ends(packed: PackedSeqParams) -> torch.Tensor:
    """The global cumulative ends (with the leading 0) of the packed params :meth:`ContextParallel.packed_params` made."""
    if packed.qkv_format != PACKED_FORMAT or packed.cu_seqlens_q is None:
        raise ValueError(f"packed_seq_params.qkv_format={packed.qkv_format!r}: packed sequences under context parallelism "
                         "take ContextParallel.packed_params(...) (megatron's THD rotary assumes its zig-zag split)")  # fmt: skip
    return packed.cu_seqlens_q


def _packed_ring(config, groups, q, k, v, causal, scale, local_cu):
    return ring_attention(q, k, v, groups.cp, causal=causal, scale=scale, cu_seqlens=local_cu,
                          window_size=config.window_size, inner_group=groups.inner, outer_group=groups.outer,
                          send_recv_overlap=config.send_recv_overlap)  # fmt: skip


def _packed_ulysses(config, groups, q, k, v, causal, scale, ends):
    # The stream is split contiguously (no per-sequence padding): ulysses treats it as one
    # [T/cp, 1] sequence and attention runs on the whole stream with the sequences' global ends.
    whole = local_attention(causal=causal, scale=scale)

    def attn_fn(q_, k_, v_, cu_seqlens=None):
        return whole(q_.squeeze(1), k_.squeeze(1), v_.squeeze(1), cu_seqlens=ends).unsqueeze(1)

    out = ulysses_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), groups.cp, attn_fn=attn_fn,
                            kv_head_repeat=config.kv_head_repeat)  # fmt: skip
    return out.squeeze(1)


def _packed_hybrid(config, groups, q, k, v, causal, scale, local_cu):
    return hybrid_attention(q, k, v, ulysses_group=groups.ulysses, ring_group=groups.ring, causal=causal, scale=scale,
                            kv_head_repeat=config.kv_head_repeat, cu_seqlens=local_cu, window_size=config.window_size,
                            inner_group=groups.inner, outer_group=groups.outer,
                            send_recv_overlap=config.send_recv_overlap)  # fmt: skip


_PACKED_ATTENTION = {RING: _packed_ring, ULYSSES: _packed_ulysses, HYBRID: _packed_hybrid}


def enable_context_parallel(model: torch.nn.Module, cp: ContextParallel) -> None:
    """Route ``model``'s core attention and rotary angles through ``cp`` (in place, idempotent).

    Packed batches reach the algorithm when the model is called with
    ``packed_seq_params=cp.packed_params(...)`` (see :class:`ContextParallel`)."""
    from mindspeed_models.attention import FlashAttention
    from mindspeed_models.rope import RotaryAngles

    model.context_parallel = cp  # read by roll() (fused-loss MTP)
    _bind_packed(model, cp)
    if getattr(model.config, "mtp_num_layers", None):
        # megatron's MTP rolls labels / loss mask (gpt_model) and input ids / positions
        # (multi_token_prediction) with a module-level roll_tensor that assumes its zig-zag split.
        _gpt_model.roll_tensor = _mtp_module.roll_tensor = functools.partial(roll_on_layout, cp)
    # MLA squeezes packed q/k to [T, N, D] before its rotary, so its angles must be [T, 1, R]
    mla_rotary = {id(m.rotary_pos_emb) for m in model.modules() if isinstance(m, MultiLatentAttention)}
    for module in model.modules():
        if isinstance(module, FlashAttention):
            module.context_parallel = cp
        elif isinstance(module, (RotaryAngles, RotaryEmbedding, YarnRotaryEmbedding)):
            _slice_rotary(module, cp, squeezed=id(module) in mla_rotary)


def _bind_packed(model: torch.nn.Module, cp: ContextParallel) -> None:
    """Make ``model``'s forward tell ``cp`` which packed batch (if any) the rotary modules serve."""
    if getattr(model, "_cp_binds_packed", False):
        return
    full = model.forward
    signature = inspect.signature(full)

    @functools.wraps(full)
    def forward(*args, **kwargs):
        cp.bind(signature.bind_partial(*args, **kwargs).arguments.get("packed_seq_params"))
        return full(*args, **kwargs)

    model.forward = forward
    model._cp_binds_packed = True


def roll_on_layout(cp: ContextParallel | None, tensor, shifts=-1, dims=-1, cp_group=None, packed_seq_params=None):
    """megatron's MTP ``roll_tensor`` (``tensor`` [..., S/cp] shifted one position left along the
    sequence, the last global position zeroed; returns it with its sum) for any CP layout.

    The local parts are all-gathered into the global sequence (labels, masks and ids: a few
    integers per token), rolled, and this rank's positions taken back. Packed sequences
    (``packed_seq_params`` from :meth:`ContextParallel.packed_params`) roll each sequence on its
    own and zero its last (padded) position: the pad tokens are zeros, so a sequence's last real
    token gets what megatron's unpadded packed roll gives it. The sum (megatron's token
    count for the MTP loss) is the whole sequence's / cp size: megatron divides each rank's MTP
    loss sum by it and averages the gradients over the cp ranks (its MTP loss scale has no cp
    factor), so the MTP loss is the sequence's token mean in the gradient and in the log, where
    a per-rank count would give a mean of per-rank means. Without CP this is megatron's roll."""
    if cp is None or cp_group is None or cp_group.size() == 1:
        return _ROLL(tensor, shifts=shifts, dims=dims, cp_group=cp_group, packed_seq_params=packed_seq_params)
    if shifts != -1 or dims not in (-1, tensor.dim() - 1):
        raise ValueError(f"roll_on_layout: only megatron MTP's roll (shifts=-1, dims=-1), got shifts={shifts}, dims={dims}")
    size, local = cp_group.size(), tensor.contiguous()
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local, group=cp_group)
    if packed_seq_params is None:
        seq = local.shape[-1] * size
        rows_of, last = functools.partial(cp.positions_of, seq), torch.tensor([seq - 1])
    else:
        ends = _padded_ends(packed_seq_params)[1:].tolist()
        seq, last = ends[-1], torch.tensor(ends) - 1
        rows_of = functools.partial(_packed_rows, cp, ends)
    full = local.new_zeros(*local.shape[:-1], seq)
    for rank, part in enumerate(parts):
        full[..., rows_of(rank, local.device)] = part
    rolled = torch.roll(full, shifts=-1, dims=-1)
    rolled[..., last.to(local.device)] = 0
    return rolled[..., rows_of(cp.rank, local.device)], rolled.sum() / size


def _packed_rows(cp: ContextParallel, ends: list[int], rank: int, device) -> torch.Tensor:
    return cp.packed_rows_of(ends, rank, device)[0]


def roll(model, tensor, shifts=-1, dims=-1, cp_group=None, packed_seq_params=None):
    """:func:`roll_on_layout` with ``model``'s context parallelism (megatron's roll without it)."""
    cp = getattr(model, "context_parallel", None)
    return roll_on_layout(cp, tensor, shifts=shifts, dims=dims, cp_group=cp_group, packed_seq_params=packed_seq_params)


def _slice_rotary(module: torch.nn.Module, cp: ContextParallel, squeezed: bool = False) -> None:
    """Make ``module.forward(max_seq_len, offset, packed_seq, cp_group)`` return the angles of this
    rank's tokens: the full table (megatron passes the global length under CP) indexed by
    ``cp.positions`` instead of megatron's zig-zag slice, or for a packed batch by each local
    token's position inside its sequence (``cp.rope_positions``, one row per token; [T/cp, 1, R]
    when ``squeezed``, for MLA's [T/cp, N, R] packed q/k, else [T/cp, 1, 1, R])."""
    if getattr(module, "_cp_sliced", False):
        return
    full = module.forward

    @functools.wraps(full)
    def forward(max_seq_len, offset=0, packed_seq=False, cp_group=None):
        if packed_seq:
            raise ValueError("megatron's THD (qkv_format 'thd') rotary under context parallelism assumes its zig-zag split; "
                             "call the model with ContextParallel.packed_params(...)")  # fmt: skip
        positions = cp.rope_positions
        length = max_seq_len if positions is None else int(positions.max()) + 1
        # packed_seq=True is how these modules skip their own (zig-zag) cp slice: the full table
        out = full(length, offset, True, None)
        emb, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        if positions is None:
            emb = emb[cp.positions(max_seq_len, emb.device)]
        else:
            emb = emb[positions.to(emb.device)]
            emb = emb[:, 0] if squeezed else emb
        return (emb, *rest) if rest is not None else emb

    module.forward = forward
    module._cp_sliced = True
