"""Experts computed with one grouped GEMM per projection (:func:`mindspeed_kernels.ops.grouped_matmul`).

:class:`GroupedSwiGLUExperts` is a drop-in for megatron's ``SequentialMLP`` inside ``MoELayer``:
it builds the very same modules (``local_experts.{e}.linear_fc1`` / ``linear_fc2``), so state
dicts, sharded checkpoints and the ``mindspeed_ckpt.maps`` names are unchanged, but its forward
runs all local experts at once instead of one MLP call per expert. Selected by
``moe_grouped_gemm=True`` (an override of :func:`mindspeed_models.from_hf_config`).

:class:`DeepSeekRouter` is DeepSeek's router, reproducing transformers' ``DeepseekV3TopkRouter``
(sigmoid scores, selection-only expert bias, groups ranked by their 2 best scores) and
``DeepseekV2TopkRouter`` (softmax scores, greedy or group-limited greedy: groups ranked by their
best score, no renormalisation) exactly; megatron's own router always renormalises sigmoid
weights and ranks groups by their top ``k / groups`` scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping, compute_routing_scores_for_aux_loss
from megatron.core.transformer.moe.router import TopKRouter

from mindspeed_kernels import ops

__all__ = ["DeepSeekRouter", "DeepSeekRouting", "GroupedSwiGLUExperts", "deepseek_topk"]


class GroupedSwiGLUExperts(SequentialMLP):
    """SwiGLU experts of an MoE layer; parameters as ``SequentialMLP`` (fc1 [2F, H] = [gate | up], fc2 [H, F]).

    ``forward(permuted_hidden [T, H], tokens_per_expert [E_local] int, permuted_probs [T])``:
    rows arrive grouped by local expert (the token dispatcher's order); returns
    ``(out [T, H], None)`` with ``out = fc2(swiglu(fc1(x)) * prob)`` per row, as ``SequentialMLP``
    (probabilities applied after the activation, in the activation's dtype).
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None) -> None:
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        if config.add_bias_linear:
            raise ValueError("GroupedSwiGLUExperts: add_bias_linear=True is not implemented; expert linears have no bias")
        if self.tp_group.size() != 1:
            # fc2's partial sums over expert-TP shards would need megatron's reduction, not done here.
            raise ValueError("GroupedSwiGLUExperts: expert_tensor_parallel_size must be 1; use moe_grouped_gemm=False")

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        if self.config.moe_apply_probs_on_input or self.config.fp8 or self.config.fp4:
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        x = permuted_local_hidden_states
        counts = tokens_per_expert.tolist() if isinstance(tokens_per_expert, torch.Tensor) else list(tokens_per_expert)
        # Stacked views of the per-expert weights as [E, in, out]; stacking keeps autograd to each
        # expert's own parameter (and its megatron attributes for DDP / optimizers).
        fc1 = torch.stack([e.linear_fc1.weight for e in self.local_experts]).transpose(1, 2)
        fc2 = torch.stack([e.linear_fc2.weight for e in self.local_experts]).transpose(1, 2)
        hidden = ops.grouped_matmul(x, fc1.to(x.dtype), counts, group_list_type=1)
        hidden = self.local_experts[0].activation_func(hidden)
        hidden = (hidden * permuted_probs.unsqueeze(-1)).to(hidden.dtype)
        return ops.grouped_matmul(hidden, fc2.to(x.dtype), counts, group_list_type=1), None


@dataclass(frozen=True)
class DeepSeekRouting:
    """How :class:`DeepSeekRouter` scores experts and turns the selected scores into weights.

    ``score_function``: "sigmoid" (DeepSeek-V3) or "softmax" (DeepSeek-V2) of the router logits.
    ``normalize``: divide the k selected scores by their sum (HF ``norm_topk_prob``), before the
    scaling factor. ``group_score_topk``: how many of a group's best scores (bias included) are
    summed to rank the groups (DeepSeek-V3: 2; DeepSeek-V2's group-limited greedy: 1, the maximum).
    """

    score_function: str = "sigmoid"
    normalize: bool = True
    group_score_topk: int = 2

    def __post_init__(self) -> None:
        if self.score_function not in ("sigmoid", "softmax"):
            raise ValueError(f"DeepSeekRouting: score_function={self.score_function!r}; use 'sigmoid' or 'softmax'")
        if isinstance(self.group_score_topk, bool) or not isinstance(self.group_score_topk, int) or self.group_score_topk < 1:
            raise ValueError(f"DeepSeekRouting: group_score_topk={self.group_score_topk!r} must be a positive int")


def deepseek_topk(
    logits: torch.Tensor,
    topk: int,
    *,
    num_groups: int | None,
    group_topk: int | None,
    expert_bias: torch.Tensor | None,
    scaling_factor: float | None,
    routing: DeepSeekRouting,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek routing of ``logits`` [T, E] -> (probs [T, E] float32, zero off the map; routing_map [T, E] bool).

    scores = sigmoid(logits) or softmax(logits) (``routing.score_function``, float32); the choice uses
    scores + ``expert_bias`` (selection only), restricted to the ``group_topk`` best of ``num_groups``
    equal expert groups (ranked by the sum of their ``routing.group_score_topk`` best choice scores);
    the weights are the unbiased scores of the k chosen experts, divided by their sum when
    ``routing.normalize``, times ``scaling_factor``.
    """
    tokens, experts = logits.shape
    scores = torch.sigmoid(logits.float()) if routing.score_function == "sigmoid" else torch.softmax(logits.float(), -1)
    choice = scores if expert_bias is None else scores + expert_bias.float()
    if num_groups and group_topk:
        per_group = experts // num_groups
        grouped = choice.view(tokens, num_groups, per_group)
        group_scores = grouped.topk(min(routing.group_score_topk, per_group), dim=-1).values.sum(-1)
        chosen_groups = group_scores.topk(group_topk, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, chosen_groups, True)
        choice = choice.masked_fill(~keep.repeat_interleave(per_group, dim=1), float("-inf"))
    index = choice.topk(topk, dim=-1).indices
    weights = scores.gather(1, index)
    if routing.normalize:
        # the same epsilon as transformers, so a (theoretical) all-zero row stays finite
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if scaling_factor:
        weights = weights * scaling_factor
    probs = torch.zeros_like(scores).scatter(1, index, weights)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, index, True)
    return probs, routing_map


class DeepSeekRouter(TopKRouter):
    """megatron's ``TopKRouter`` (same parameters: ``weight`` [E, H], ``expert_bias`` [E] when
    ``moe_router_enable_expert_bias``) with :func:`deepseek_topk` as its top-k.

    Reads ``moe_router_topk``, ``moe_router_num_groups``, ``moe_router_group_topk`` and
    ``moe_router_topk_scaling_factor`` from the config; ``routing`` is the :class:`DeepSeekRouting`.
    ``forward(input [S, B, H])`` -> (probs [S*B, E], routing_map [S*B, E]) as ``TopKRouter``. In
    training (autograd on) the selected-token counts are accumulated for megatron's expert-bias
    update (``moe_router_bias_update_rate``). The rest is megatron's own machinery, in its order:
    z-loss (``moe_z_loss_coeff``), token dropping (``moe_expert_capacity_factor``,
    ``moe_token_drop_policy``, ``moe_pad_expert_input_to_capacity``) and the balance losses
    (``moe_router_load_balancing_type`` "aux_loss" / "seq_aux_loss" / "global_aux_loss" with
    ``moe_aux_loss_coeff``; DeepSeek-V3's sequence-wise loss is "seq_aux_loss"), computed by megatron on
    the softmax scores, or the sigmoid scores normalised over all experts, and their unbiased top-k, as
    the DeepSeek-V2/V3 reports define them.
    """

    def __init__(self, config, pg_collection=None, *, routing: DeepSeekRouting = DeepSeekRouting()) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        if config.moe_router_score_function != routing.score_function or self.routing_type == "sinkhorn":
            raise ValueError(
                f"DeepSeekRouter: needs moe_router_score_function={routing.score_function!r} (the routing's) and a "
                f"moe_router_load_balancing_type other than 'sinkhorn' (got {config.moe_router_score_function!r}, "
                f"{config.moe_router_load_balancing_type!r})"
            )
        self.deepseek_routing = routing

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        probs, routing_map = deepseek_topk(
            logits,
            self.topk,
            num_groups=self.config.moe_router_num_groups,
            group_topk=self.config.moe_router_group_topk,
            expert_bias=self.expert_bias,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            routing=self.deepseek_routing,
        )
        probs = probs.type_as(logits)
        if self.config.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs,
                routing_map,
                router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            probs = self._balance_losses(probs, logits, padding_mask, seq_length, bsz)
        # token counts for megatron's expert-bias update (training only; a no-op without autograd)
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map

    def _balance_losses(self, probs, logits, padding_mask, seq_length: int, bsz: int) -> torch.Tensor:
        """megatron's aux / sequence-aux / global-aux losses attached to ``probs`` (autograd side channel)."""
        aux_map, aux_scores = compute_routing_scores_for_aux_loss(
            logits, self.topk, self.score_function, fused=self.config.moe_router_fusion, padding_mask=padding_mask
        )
        masked = padding_mask is not None
        probs = self._apply_aux_loss(probs, aux_scores, aux_map, with_padding_mask=masked)
        probs = self._apply_seq_aux_loss(probs, aux_scores, aux_map, seq_length, bsz, with_padding_mask=masked)
        return self._apply_global_aux_loss(probs, aux_scores, aux_map, with_padding_mask=masked)
