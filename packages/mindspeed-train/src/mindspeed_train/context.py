"""Context parallelism in the loop: the CP algorithm's groups, each rank's share of a batch and
the loss over a sequence split across ranks.

Each CP rank holds ``S / cp`` tokens of every sequence, at the positions the algorithm's layout
gives (``mindspeed_parallel.cp.runtime.positions``: contiguous for ulysses, zig-zag for ring,
both for hybrid); the model attends over the whole sequence through the algorithm, and rotary
angles follow the same positions. The loss of a microbatch is the token mean over the whole
sequence: each rank returns ``local sum / global count``; megatron's schedule multiplies it by the
cp size and its DDP averages gradients over the data x context ranks, which yields the gradient of
that mean.

Packed batches (``segments``: neat packs, ``--reset-attention-mask`` documents) become one THD row
as without CP. Ulysses takes a contiguous slice of that stream as it is; for ring and hybrid every
sequence is first padded at its tail to the algorithm's multiple (pad tokens are zeros with loss
mask 0, invisible to the real tokens under the causal mask) and then split on its own across the
cp ranks (:func:`split_packed_batch`). The model gets ``ContextParallel.packed_params`` so
attention stays inside each sequence and the rotary angles are each token's position inside its
sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mindspeed_train.config import TrainConfig

SPLIT_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


PACKED = "packed sequences (--reset-attention-mask / --neat-pack)"


def check(config: TrainConfig, hf: dict) -> None:
    """Refuse, before any process starts work, what CP does not cover in training yet."""
    cp = config.parallel.cp
    if cp is None or not config.data.packed:
        return
    from mindspeed_models.context_parallel import PACKED_ALGORITHMS

    if cp.algo not in PACKED_ALGORITHMS:
        raise ValueError(f"--context-parallel-algo {cp.algo} cannot take {PACKED} (its mask-aware plan has no TND form); "
                         f"use one of {', '.join(PACKED_ALGORITHMS)}")  # fmt: skip
    if cp.mask_type != "causal":
        raise ValueError(f"--cp-attention-mask-type general with {PACKED}: cu_seqlens keep the documents apart under the "
                         "causal mask; use --cp-attention-mask-type causal")  # fmt: skip
    if config.parallel.pipeline > 1:
        raise ValueError(f"{PACKED} under context parallelism with --pipeline-model-parallel-size > 1: padding each "
                         "document varies the THD length per microbatch, but megatron's pipeline p2p sends fixed "
                         "shapes; use --pipeline-model-parallel-size 1")  # fmt: skip
    if config.parallel.sequence_parallel:
        raise ValueError(f"--sequence-parallel with {PACKED} under context parallelism is not implemented (the padded "
                         "local THD length need not divide by the TP size); drop --sequence-parallel")  # fmt: skip


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
        raise ValueError("split_batch: a packed batch (with 'segments') goes through split_packed_batch")
    seq = batch["tokens"].shape[1]
    index = cp.positions(seq, batch["tokens"].device)
    return {key: value.index_select(1, index) if key in SPLIT_KEYS else value for key, value in batch.items()}


def split_packed_batch(batch: dict, cp) -> tuple[dict, object]:
    """This rank's part of a packed ``[micro, S]`` batch with ``segments``, and the model's
    PackedSeqParams (``cp.packed_params``).

    The rows are laid end to end as one THD sequence (``mindspeed_train.data.sft.thd_layout``: a
    row boundary always starts a sequence), every sequence is padded at its tail with zeros
    (token 0, label 0, loss mask 0, position 0) to ``cp.packed_multiple`` tokens (1, no padding, for
    ulysses), and each key of :data:`SPLIT_KEYS` is cut with the algorithm's layout (per sequence
    for ring and hybrid, a contiguous slice of the stream for ulysses). Returns ``[1, T / cp]``
    tensors (other keys but ``segments`` unchanged) plus ``real_mask`` (1 on the batch's own
    tokens, 0 on the padding: the MTP loss's mask, which megatron otherwise takes as all ones)
    and the params."""
    from mindspeed_parallel.cp.data import padded_packed_rows
    from mindspeed_train.data.sft import thd_layout

    cu, _ = thd_layout(batch["segments"])
    device = batch["tokens"].device
    rows, padded_cu = padded_packed_rows(cu, cp.packed_multiple, device=device)
    local, _ = cp.packed_rows_of(padded_cu, cp.rank, device)
    out = {}
    for key, value in batch.items():
        if key in SPLIT_KEYS:
            full = value.new_zeros(padded_cu[-1])
            full[rows] = value.reshape(-1)
            out[key] = full[local].reshape(1, -1)
        elif key != "segments":
            out[key] = value
    real = batch["labels"].new_zeros(padded_cu[-1])
    real[rows] = 1
    out["real_mask"] = real[local].reshape(1, -1)
    return out, cp.packed_params(padded_cu, device)


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
