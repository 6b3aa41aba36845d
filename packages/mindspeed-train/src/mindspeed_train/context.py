"""Context parallelism in the loop: the CP algorithm's groups, each rank's share of a batch and
the loss over a sequence split across ranks.

Each CP rank holds ``S / cp`` tokens of every sequence, at the positions the algorithm's layout
gives (``mindspeed_parallel.cp.runtime.positions``: contiguous for ulysses, zig-zag for ring,
both for hybrid); the model attends over the whole sequence through the algorithm, and rotary
angles follow the same positions. The loss of a microbatch is the token mean over the whole
sequence: each rank returns ``local sum / global count``; megatron's schedule multiplies it by the
cp size and its DDP averages gradients over the data x context ranks, which yields the gradient of
that mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mindspeed_train.config import TrainConfig

SPLIT_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def check(config: TrainConfig, hf: dict) -> None:
    """Refuse, before any process starts work, what CP does not cover in training yet."""
    cp = config.parallel.cp
    if cp is None:
        return
    if config.data.packed:
        raise ValueError("packed sequences (--reset-attention-mask, --neat-pack) under context parallelism are not "
                         "implemented yet; drop them or use --context-parallel-size 1")  # fmt: skip


def build(config: TrainConfig):
    """This rank's ``mindspeed_models.context_parallel.ContextParallel`` (None without CP).
    Collective: creates the algorithm's sub-groups on every rank; call after ``init_parallel``."""
    cp_config = config.parallel.cp
    if cp_config is None:
        return None
    from megatron.core import parallel_state as ps

    from mindspeed_models.context_parallel import ContextParallel
    from mindspeed_parallel.cp import runtime

    group = ps.get_context_parallel_group()
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, tuple(dist.get_process_group_ranks(group)))
    groups = runtime.make_groups(cp_config, group, sorted(set(every)))
    return ContextParallel(cp_config, groups, ps.get_context_parallel_rank(), mask_lengths=(config.batch.seq_length,))


def split_batch(batch: dict, cp) -> dict:
    """This rank's tokens of a [B, S] batch (every key in :data:`SPLIT_KEYS`), at ``cp.positions``."""
    if "segments" in batch:
        raise ValueError("packed sequences (--reset-attention-mask / instruction packs) under context parallelism "
                         "are not implemented yet; use --context-parallel-size 1")  # fmt: skip
    seq = batch["tokens"].shape[1]
    index = cp.positions(seq, batch["tokens"].device)
    return {key: value.index_select(1, index) if key in SPLIT_KEYS else value for key, value in batch.items()}


def loss(loss_mask: torch.Tensor, output: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, token-mean loss to report) of one microbatch whose tokens are
    spread over the CP ``group``: ``local sum / global count`` (megatron's schedule scales it by
    the cp size) and ``global sum / global count``."""
    mask = loss_mask.reshape(-1).float()
    local = torch.sum(output.reshape(-1).float() * mask)
    totals = torch.stack([local.detach(), mask.sum()])
    dist.all_reduce(totals, group=group)
    count = totals[1].clamp(min=1)
    return local / count, totals[0] / count
