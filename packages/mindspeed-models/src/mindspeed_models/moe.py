"""Experts computed with one grouped GEMM per projection (:func:`mindspeed_kernels.ops.grouped_matmul`).

:class:`GroupedSwiGLUExperts` is a drop-in for megatron's ``SequentialMLP`` inside ``MoELayer``:
it builds the very same modules (``local_experts.{e}.linear_fc1`` / ``linear_fc2``), so state
dicts, sharded checkpoints and the ``mindspeed_ckpt.maps`` names are unchanged, but its forward
runs all local experts at once instead of one MLP call per expert. Selected by
``moe_grouped_gemm=True`` (an override of :func:`mindspeed_models.from_hf_config`).

:class:`SigmoidGroupRouter` is DeepSeek-V3's router (sigmoid scores, selection-only expert bias,
group-limited top-k), reproducing transformers' ``DeepseekV3TopkRouter`` exactly; megatron's own
sigmoid path always renormalises the k weights and ranks groups by their top ``k / groups`` scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.router import TopKRouter

from mindspeed_kernels import ops

__all__ = ["GroupedSwiGLUExperts", "SigmoidGroupRouter", "SigmoidRouting", "sigmoid_group_topk"]


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
class SigmoidRouting:
    """How :class:`SigmoidGroupRouter` turns the selected sigmoid scores into weights.

    ``normalize``: divide the k selected scores by their sum (HF ``norm_topk_prob``), before the
    scaling factor. ``group_score_topk``: how many of a group's best scores (bias included) are
    summed to rank the groups (DeepSeek-V3: 2, whatever k and the group counts are).
    """

    normalize: bool = True
    group_score_topk: int = 2


def sigmoid_group_topk(
    logits: torch.Tensor,
    topk: int,
    *,
    num_groups: int | None,
    group_topk: int | None,
    expert_bias: torch.Tensor | None,
    scaling_factor: float | None,
    routing: SigmoidRouting,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing of ``logits`` [T, E] -> (probs [T, E] float32, zero off the map; routing_map [T, E] bool).

    scores = sigmoid(logits); the choice uses scores + ``expert_bias`` (selection only), restricted
    to the ``group_topk`` best of ``num_groups`` equal expert groups (ranked by the sum of their
    ``routing.group_score_topk`` best choice scores); the weights are the unbiased scores of the
    k chosen experts, divided by their sum when ``routing.normalize``, times ``scaling_factor``.
    """
    tokens, experts = logits.shape
    scores = torch.sigmoid(logits.float())
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


class SigmoidGroupRouter(TopKRouter):
    """megatron's ``TopKRouter`` (same parameters: ``weight`` [E, H], ``expert_bias`` [E] when
    ``moe_router_enable_expert_bias``) with :func:`sigmoid_group_topk` as its top-k.

    Reads ``moe_router_topk``, ``moe_router_num_groups``, ``moe_router_group_topk`` and
    ``moe_router_topk_scaling_factor`` from the config; ``routing`` is the :class:`SigmoidRouting`.
    ``forward(input [S, B, H])`` -> (probs [S*B, E], routing_map [S*B, E]) as ``TopKRouter``. In
    training (autograd on) the selected-token counts are accumulated for megatron's expert-bias
    update (``moe_router_bias_update_rate``); no auxiliary loss is applied (the config must say
    ``moe_router_load_balancing_type="none"``).
    """

    def __init__(self, config, pg_collection=None, *, routing: SigmoidRouting = SigmoidRouting()) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        if config.moe_router_score_function != "sigmoid" or config.moe_router_load_balancing_type != "none":
            raise ValueError(
                "SigmoidGroupRouter: needs moe_router_score_function='sigmoid' and moe_router_load_balancing_type='none'"
            )
        if config.moe_expert_capacity_factor is not None:
            raise ValueError("SigmoidGroupRouter: moe_expert_capacity_factor is not supported; leave it None")
        self.sigmoid_routing = routing

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        probs, routing_map = sigmoid_group_topk(
            logits,
            self.topk,
            num_groups=self.config.moe_router_num_groups,
            group_topk=self.config.moe_router_group_topk,
            expert_bias=self.expert_bias,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
            routing=self.sigmoid_routing,
        )
        # token counts for megatron's expert-bias update (training only; a no-op without autograd)
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs.type_as(logits), routing_map
