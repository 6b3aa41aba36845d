"""Shared helpers for the adaptor tests: a tiny megatron-core GPTModel built with megatron's own
local spec (``get_gpt_layer_local_spec``), parallel-state setup, copying a full (TP=PP=EP=1) model
into a sharded one, and gathering TP shards back.

Loaded by path (``load_helpers()`` in each test file), so run_world's children find it too.
megatron is imported inside functions: the pytest process itself never pays for it.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

VOCAB, SEQ, HIDDEN, HEADS = 128, 16, 32, 4


def tiny_config(**overrides):
    """An fp32 TransformerConfig with tiny sizes, CPU initialisation and no dropout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=64, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        bf16=False, fp16=False, normalization="RMSNorm", add_bias_linear=False,
    )  # fmt: skip
    base.update(overrides)
    return TransformerConfig(**base)


def init_parallel(seed: int = 1234, **sizes) -> None:
    """(Re)initialise megatron's parallel state with ``sizes`` (initialize_model_parallel kwargs)
    and seed the RNG tracker."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**sizes)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def build_gpt(config, *, num_experts: int | None = None, vp_stage: int | None = None, **kwargs):
    """A GPTModel on megatron's local (non-TE) layer spec; pre/post_process from the PP stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=num_experts, normalization=config.normalization)
    pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    kwargs.setdefault("position_embedding_type", "rope")
    return GPTModel(config, spec, VOCAB, SEQ, pre_process=pre, post_process=post, vp_stage=vp_stage, **kwargs)


def batch(seed: int, micro_batch: int = 2, seq: int = SEQ) -> dict[str, torch.Tensor]:
    """Token ids, position ids and labels [micro_batch, seq] from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (micro_batch, seq + 1), generator=gen)
    positions = torch.arange(seq).expand(micro_batch, seq)
    return {"input_ids": tokens[:, :-1], "position_ids": positions, "labels": tokens[:, 1:]}


def full_state(model) -> dict[str, torch.Tensor]:
    """Detached copies of a (TP=PP=EP=1) model's parameters."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def global_name(model, name: str) -> str:
    """The TP=PP=EP=1 name of ``model``'s parameter ``name``: local layer and expert indices
    become global ones (megatron's ``layer_number`` and EP rank)."""
    from megatron.core import parallel_state as ps

    match = re.match(r"decoder\.layers\.(\d+)\.", name)
    if match:
        layer = model.decoder.layers[int(match.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}.{name[match.end() :]}"
    match = re.search(r"local_experts\.(\d+)\.", name)
    if match:
        n_local = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
        expert = ps.get_expert_model_parallel_rank() * n_local + int(match.group(1))
        name = f"{name[: match.start()]}local_experts.{expert}.{name[match.end() :]}"
    return name


def reference_name(model, name: str, full: dict) -> str:
    """``global_name``, with a tied output layer mapped onto the word embeddings."""
    name = global_name(model, name)
    if name not in full and name == "output_layer.weight":
        return "embedding.word_embeddings.weight"
    return name


def tp_shard(param, full_tensor: torch.Tensor) -> torch.Tensor:
    """This TP rank's slice of ``full_tensor`` for ``param`` (contiguous chunks, stride 1)."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return full_tensor
    if getattr(param, "allreduce", True) is False:  # expert weights shard over expert-TP
        rank, size = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    else:
        rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    return full_tensor.chunk(size, dim=param.partition_dim)[rank]


def load_full(model, full: dict[str, torch.Tensor]) -> None:
    """Copy a full model's parameters into the sharded ``model`` (TP/PP/EP/VPP chunk)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(tp_shard(param, full[reference_name(model, name, full)]))


def gather_tp(param, tensor: torch.Tensor) -> torch.Tensor:
    """All-gather a TP-sharded ``tensor`` of ``param`` along its partition dim (as-is if replicated)."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return tensor
    return gather_last(tensor.transpose(0, param.partition_dim).contiguous(), ps.get_tensor_model_parallel_group(),
                       dim=0).transpose(0, param.partition_dim)  # fmt: skip


def gather_last(tensor: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank of ``group`` along ``dim``."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def wrap_ddp(config, model, *, distributed_optimizer: bool = False):
    """megatron's DistributedDataParallel around ``model`` (no overlap, one bucket)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=False, overlap_grad_reduce=False, use_distributed_optimizer=distributed_optimizer
    )
    return DistributedDataParallel(config, ddp_config, model)


def _mean_loss(output: torch.Tensor):
    """Per-token losses [B, S] -> the microbatch mean, also reported for the comparison."""
    loss = output.mean()
    return loss, {"loss": loss.detach().clone()}


def _lm_forward_step(data_iterator, model):
    data = next(data_iterator)
    # On stages without the embedding, input_ids are ignored (the schedule feeds hidden states).
    output = model(data["input_ids"], data["position_ids"], None, labels=data["labels"])
    return output, _mean_loss


def run_schedule(chunks, micro: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """One forward/backward over the microbatches ``micro`` (dicts of input_ids, position_ids,
    labels) with megatron's schedule for the current parallel state; the per-microbatch mean
    losses (empty on stages other than the last)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro)
    batch_size, seq = micro[0]["input_ids"].shape
    store = get_forward_backward_func()(
        forward_step_func=_lm_forward_step, data_iterator=iterators, model=chunks, num_microbatches=len(micro),
        seq_length=seq, micro_batch_size=batch_size, forward_only=False,
    )  # fmt: skip
    return [entry["loss"] for entry in store]


# --- stride-aware TP sharding, for our models (fc1 = [gate | up] has partition_stride 2) -------


def shard_group(name: str, param):
    """The process group that splits ``param`` (None when replicated): the expert-TP group for routed
    experts (``...local_experts.{e}...``), the TP group for everything else."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return None
    if ".local_experts." in name:
        return ps.get_expert_tensor_parallel_group()
    return ps.get_tensor_model_parallel_group()


def shard_strided(name: str, param, full_tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``full_tensor`` for parameter ``name``: megatron splits each of the
    ``partition_stride`` blocks along ``partition_dim`` separately (fc1's gate and up halves)."""
    group = shard_group(name, param)
    if group is None or dist.get_world_size(group) == 1:
        return full_tensor
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    return torch.cat([block.chunk(size, dim)[rank] for block in full_tensor.chunk(stride, dim)], dim)


def gather_strided(name: str, param, local: torch.Tensor) -> torch.Tensor:
    """Inverse of ``shard_strided``: all-gather ``local`` (e.g. the gradient) over the group that splits
    ``param`` and reassemble the full tensor."""
    group = shard_group(name, param)
    if group is None or dist.get_world_size(group) == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    blocks = [part.chunk(stride, dim) for part in parts]
    return torch.cat([torch.cat([b[i] for b in blocks], dim) for i in range(stride)], dim)
