"""One entry point per job for the CP algorithms: the groups an algorithm needs, its attention
call and where each rank's tokens sit in the global sequence.

A model calls :func:`attention` with its local q/k/v and never names an algorithm; the data
pipeline and the rotary embedding call :func:`positions` so that every rank holds (and rotates)
exactly the tokens the algorithm expects. The dispatch is an explicit table keyed by
:data:`mindspeed_parallel.cp.config.ALGORITHMS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mindspeed_parallel.cp import data
from mindspeed_parallel.cp.adaptive import AdaptiveOptions, AdaptivePlan, AdaptivePlanner
from mindspeed_parallel.cp.adaptive_attention import adaptive_attention, hybrid_adaptive_attention
from mindspeed_parallel.cp.adaptive_data import hybrid_adaptive_indices
from mindspeed_parallel.cp.config import ADAPTIVE, HYBRID, HYBRID_ADAPTIVE, RING, ULYSSES, CPConfig
from mindspeed_parallel.cp.hybrid import hybrid_attention, hybrid_indices, make_hybrid_groups
from mindspeed_parallel.cp.ring import make_double_ring_groups, ring_attention
from mindspeed_parallel.cp.ulysses import local_attention, ulysses_attention


@dataclass(frozen=True)
class CPGroups:
    """This rank's process groups for one CP algorithm: ``cp`` (all cp ranks), and where the
    algorithm needs them the ulysses / ring parts (hybrid) and the double ring's inner / outer
    groups (``cp_window_size`` > 1)."""

    cp: dist.ProcessGroup
    ulysses: dist.ProcessGroup | None = None
    ring: dist.ProcessGroup | None = None
    inner: dist.ProcessGroup | None = None
    outer: dist.ProcessGroup | None = None


def make_groups(config: CPConfig, cp_group: dist.ProcessGroup, all_cp_ranks: Sequence[Sequence[int]]) -> CPGroups:
    """Create the sub-groups ``config`` needs; collective over the default group.

    ``all_cp_ranks``: the global ranks of *every* CP group of the job, the same list on every
    process (``dist.new_group`` must be called for every group everywhere, in one order).
    ``cp_group``: this rank's CP group (megatron's). Returns this rank's :class:`CPGroups`.
    """
    me, found = dist.get_rank(), {}
    for ranks in all_cp_ranks:
        ranks = sorted(int(r) for r in ranks)
        if len(ranks) != config.size:
            raise ValueError(f"a CP group has {len(ranks)} ranks but context_parallel_size is {config.size}")
        mine = _sub_groups(config, ranks)
        if me in ranks:
            found = mine
    return CPGroups(cp=cp_group, **found)


def _sub_groups(config: CPConfig, ranks: list[int]) -> dict:
    """This rank's sub-groups of the CP group ``ranks`` (every process runs this for every group)."""
    found, rings = {}, [ranks]
    if config.algo in (HYBRID, HYBRID_ADAPTIVE):
        found["ulysses"], found["ring"] = make_hybrid_groups(ranks, config.ulysses_degree)
        rings = [ranks[j :: config.ulysses_degree] for j in range(config.ulysses_degree)]
    if config.window_size > 1:
        for ring in rings:
            inner, outer = make_double_ring_groups(ring, config.window_size)
            if inner is not None:
                found["inner"], found["outer"] = inner, outer
    return {key: value for key, value in found.items() if value is not None}


def attention(
    config: CPConfig,
    groups: CPGroups,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    attention_mask: torch.Tensor | None = None,
    scale: float | None = None,
    plan: AdaptivePlan | None = None,
) -> torch.Tensor:
    """Attention of this rank's tokens over the whole sequence with ``config``'s algorithm.

    ``q`` [S/cp, B, Nq, D], ``k``/``v`` [S/cp, B, Nkv, D(v)] holding the positions
    :func:`positions` gives; ``causal`` or a general ``attention_mask`` (bool, True = hidden,
    [S, S] or [B, 1, S, S] in global positions; pass ``causal=False`` with it). ``plan``: the
    adaptive algorithms' plan for this mask (:func:`make_planner`; required by them). Returns
    [S/cp, B, Nq, Dv] in q's dtype. Collective over ``groups.cp``.
    """
    if config.layout == "adaptive" and plan is None:
        raise ValueError(f"{config.algo} needs the plan of this mask: pass plan=make_planner(config).plan(mask)")
    return _ATTENTION[config.algo](config, groups, q, k, v, causal, attention_mask, scale, plan)


def make_planner(config: CPConfig, mask_list=None) -> AdaptivePlanner | None:
    """The adaptive algorithms' planner (plans cached by mask unless ``adaptive_dynamic_attn_mask``;
    ``mask_list``: masks planned up front, ``adaptive_cp_manually_set_mask_list``); None for the others."""
    if config.layout != "adaptive":
        return None
    options = AdaptiveOptions(without_coarse=config.adaptive_without_coarse,
                              dynamic_attn_mask=config.adaptive_dynamic_attn_mask,
                              only_reschedule=config.adaptive_only_reschedule)  # fmt: skip
    return AdaptivePlanner(config.size // (config.ulysses_degree or 1), options, mask_list=mask_list)


def _ring(config, groups, q, k, v, causal, mask, scale, plan):
    return ring_attention(q, k, v, groups.cp, causal=causal, attention_mask=mask, scale=scale,
                          window_size=config.window_size, inner_group=groups.inner, outer_group=groups.outer,
                          send_recv_overlap=config.send_recv_overlap)  # fmt: skip


def _ulysses(config, groups, q, k, v, causal, mask, scale, plan):
    attn_fn = local_attention(causal=causal, attention_mask=mask, scale=scale)
    return ulysses_attention(q, k, v, groups.cp, attn_fn=attn_fn, kv_head_repeat=config.kv_head_repeat)


def _hybrid(config, groups, q, k, v, causal, mask, scale, plan):
    return hybrid_attention(q, k, v, ulysses_group=groups.ulysses, ring_group=groups.ring, causal=causal,
                            attention_mask=mask, scale=scale, kv_head_repeat=config.kv_head_repeat,
                            window_size=config.window_size, inner_group=groups.inner, outer_group=groups.outer,
                            send_recv_overlap=config.send_recv_overlap)  # fmt: skip


def _adaptive(config, groups, q, k, v, causal, mask, scale, plan):
    return adaptive_attention(q, k, v, groups.cp, attention_mask=mask, causal=causal, plan=plan, scale=scale)


def _hybrid_adaptive(config, groups, q, k, v, causal, mask, scale, plan):
    return hybrid_adaptive_attention(q, k, v, ulysses_group=groups.ulysses, adaptive_group=groups.ring,
                                     attention_mask=mask, causal=causal, plan=plan, scale=scale,
                                     kv_head_repeat=config.kv_head_repeat)  # fmt: skip


_ATTENTION = {ULYSSES: _ulysses, RING: _ring, HYBRID: _hybrid, ADAPTIVE: _adaptive, HYBRID_ADAPTIVE: _hybrid_adaptive}


def positions(
    config: CPConfig, seq_len: int, cp_rank: int, device=None, plan: AdaptivePlan | None = None
) -> torch.Tensor:
    """Global positions (int64 [seq_len / cp]) of the tokens ``cp_rank`` holds, in its local order:
    what to take from a full [.., S, ..] batch and the rotary positions of the local tokens
    (the adaptive algorithms: from their ``plan``)."""
    if config.algo == ULYSSES:
        return data.contiguous_indices(seq_len, config.size, cp_rank, device)
    if config.algo == RING:
        return data.zigzag_indices(seq_len, config.size, cp_rank, device)
    if config.algo == HYBRID:
        return hybrid_indices(seq_len, config.ulysses_degree, config.ring_degree, cp_rank, device)
    if plan is None or plan.seq_len != seq_len:
        raise ValueError(f"{config.algo}: positions need the plan for sequence length {seq_len} (make_planner)")
    if config.algo == ADAPTIVE:
        return plan.indices(cp_rank, device=device)
    return hybrid_adaptive_indices(plan, config.ulysses_degree, cp_rank, device)
