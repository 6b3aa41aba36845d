"""The auxiliary losses of a step for the log: MoE balancing / z-losses and each MTP layer's loss.

megatron-core's routers and MTP block add these to the gradient themselves and record the values
in trackers (``moe_utils`` layer-wise tracker, ``MTPLossLoggingHelper``): per layer, summed over the
step's microbatches. megatron's ``track_moe_metrics`` / ``track_mtp_metrics`` reduce them with
``ReduceOp.AVG``, which gloo does not have, so this module applies the same reduction with sums:
over the pipeline group (each stage holds its own layers), the tracker's reduce group (plus DP when
that group lacks it), its average group; then the mean over the step's microbatches and, for MoE,
over the MoE layers (main and MTP), as megatron logs them (``load_balancing_loss``, ``mtp_1 loss``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _mean_over(values: torch.Tensor, group) -> None:
    dist.all_reduce(values, group=group)
    values /= dist.get_world_size(group=group)


def _within_stage(entry: dict, dp_when_missing: bool) -> torch.Tensor:
    """An entry reduced over its groups (they all lie inside one pipeline stage)."""
    from megatron.core import parallel_state as ps

    values = entry["values"].detach().clone().float()
    if entry.get("reduce_group") is not None:
        dist.all_reduce(values, group=entry["reduce_group"])
        if dp_when_missing and not entry.get("reduce_group_has_dp", False):
            _mean_over(values, ps.get_data_parallel_group())
    if entry.get("avg_group") is not None:
        _mean_over(values, entry["avg_group"])
    return values


def _across_stages(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each name's values over the pipeline stages (a stage fills only its own layers; names
    a stage never saw, e.g. MTP on the first stage, count as zeros)."""
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    gathered: list = [None] * dist.get_world_size(group=group)
    dist.all_gather_object(gathered, {name: values.tolist() for name, values in local.items()}, group=group)
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        for name, values in part.items():
            merged[name] = merged.get(name, torch.zeros(len(values))) + torch.tensor(values)
    return merged


def _moe_layers(config) -> int:
    freq, layers = config.moe_layer_freq, config.num_layers
    count = sum(1 for i in range(layers) if i % freq == 0) if isinstance(freq, int) else sum(freq)
    return count + (config.mtp_num_layers or 0)


def reset() -> None:
    """Empty megatron's process-wide MoE and MTP trackers, names included (megatron's own clearing
    only zeroes the values): a job built after another in the same process must not log the
    earlier model's entries."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    get_moe_layer_wise_logging_tracker().clear()
    MTPLossLoggingHelper.tracker.clear()


def collect(config, num_microbatches: int) -> dict[str, float]:
    """The step's auxiliary losses (name -> value; empty for dense models without MTP), read from
    megatron's trackers and cleared there. Collective: every rank must call it after each step
    (a model without MoE layers or MTP has nothing to track: no communication then)."""
    if not config.num_moe_experts and not config.mtp_num_layers:
        return {}
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker, mtp = get_moe_layer_wise_logging_tracker(), MTPLossLoggingHelper.tracker
    local = {name: _within_stage(tracker[name], dp_when_missing=True) for name in sorted(tracker)}
    if "values" in mtp:
        local["mtp"] = _within_stage(mtp, dp_when_missing=False)
    merged = _across_stages(local)
    clear_aux_losses_tracker()
    if "values" in mtp:
        MTPLossLoggingHelper.clean_loss_in_tracker()
    out = {f"mtp_{i + 1} loss": value / num_microbatches for i, value in enumerate(merged.pop("mtp", torch.zeros(0)).tolist())}
    for name, values in merged.items():
        out[name] = float(values.sum()) / num_microbatches / _moe_layers(config)
    return dict(sorted(out.items()))
