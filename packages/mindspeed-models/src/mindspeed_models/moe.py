"""Experts computed with one grouped GEMM per projection (:func:`mindspeed_kernels.ops.grouped_matmul`).

:class:`GroupedSwiGLUExperts` is a drop-in for megatron's ``SequentialMLP`` inside ``MoELayer``:
it builds the very same modules (``local_experts.{e}.linear_fc1`` / ``linear_fc2``), so state
dicts, sharded checkpoints and the ``mindspeed_ckpt.maps`` names are unchanged, but its forward
runs all local experts at once instead of one MLP call per expert. Selected by
``moe_grouped_gemm=True`` (an override of :func:`mindspeed_models.from_hf_config`).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from mindspeed_kernels import ops

__all__ = ["GroupedSwiGLUExperts"]


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
