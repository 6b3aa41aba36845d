"""Batch and parallel-layout rules (Megatron-LM's own checks and seeds 000/002/003)."""

from __future__ import annotations

from mindspeed_args.rules.base import Rule, multiple_of

TP, PP, CP = "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"


def _size(v, name: str) -> int:
    return getattr(v, name) or 1


RULES: tuple[Rule, ...] = (
    Rule(
        id="parallel.world-size", source="Megatron-LM (initialize_model_parallel)",
        reads=("world_size", TP, PP, CP),
        applies=lambda v: v.world_size is not None,
        holds=lambda v: multiple_of(v.world_size, _size(v, TP) * _size(v, PP) * _size(v, CP)),
        constraint="world size must be a multiple of TP x PP x CP = {m}",
        fix="launch a multiple of {m} processes or change the parallel sizes",
        extra=lambda v: {"m": _size(v, TP) * _size(v, PP) * _size(v, CP)},
    ),
    Rule(
        id="batch.global-divisible", source="seed 003 (global_batch_size); Megatron-LM",
        reads=("global_batch_size", "micro_batch_size", "data_parallel_size"),
        applies=lambda v: None not in (v.global_batch_size, v.micro_batch_size, v.data_parallel_size),
        holds=lambda v: multiple_of(v.global_batch_size, v.micro_batch_size * v.data_parallel_size),
        constraint="global_batch_size must be a multiple of micro_batch_size x data-parallel size = {m}",
        fix="set global_batch_size to a multiple of {m} (e.g. {m}) or change micro_batch_size",
        extra=lambda v: {"m": v.micro_batch_size * v.data_parallel_size},
        blame=("global_batch_size", "micro_batch_size", "data_parallel_size"),
    ),
    Rule(
        id="parallel.sequence-parallel-needs-tp", source="seed 003 (sequence_parallel)",
        reads=("sequence_parallel", TP),
        applies=lambda v: bool(v.sequence_parallel), holds=lambda v: _size(v, TP) > 1,
        constraint="sequence_parallel needs tensor_model_parallel_size > 1",
        fix="raise tensor_model_parallel_size or drop sequence_parallel",
    ),
    Rule(
        id="parallel.heads-divisible-by-tp", source="Megatron-LM (validate_args)",
        reads=("num_attention_heads", TP),
        applies=lambda v: v.num_attention_heads is not None,
        holds=lambda v: multiple_of(v.num_attention_heads, _size(v, TP)),
        constraint="num_attention_heads must be a multiple of tensor_model_parallel_size",
        fix="use a tensor_model_parallel_size that divides {num_attention_heads}",
    ),
    Rule(
        id="parallel.vpp-exclusive", source="seed 003 (num_layers_per_virtual_pipeline_stage)",
        reads=("num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank"),
        applies=lambda v: v.num_layers_per_virtual_pipeline_stage is not None,
        holds=lambda v: v.num_virtual_stages_per_pipeline_rank is None,
        constraint="set either num_layers_per_virtual_pipeline_stage or num_virtual_stages_per_pipeline_rank, not both",
        fix="drop one of them",
    ),
    Rule(
        id="parallel.vpp-needs-pp", source="Megatron-LM (validate_args)",
        reads=("num_layers_per_virtual_pipeline_stage", "num_virtual_stages_per_pipeline_rank", PP),
        applies=lambda v: v.num_layers_per_virtual_pipeline_stage is not None
        or v.num_virtual_stages_per_pipeline_rank is not None,
        holds=lambda v: _size(v, PP) > 1,
        constraint="virtual pipeline stages need pipeline_model_parallel_size > 1",
        fix="raise pipeline_model_parallel_size or drop the virtual-pipeline setting",
    ),
    Rule(
        id="parallel.layers-divisible-by-pp", source="Megatron-LM (validate_args)",
        reads=("num_layers", PP, "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"),
        applies=lambda v: v.num_layers is not None and v.decoder_first_pipeline_num_layers is None
        and v.decoder_last_pipeline_num_layers is None,
        holds=lambda v: multiple_of(v.num_layers, _size(v, PP)),
        constraint="num_layers must be a multiple of pipeline_model_parallel_size for an even split",
        fix="set decoder_first/last_pipeline_num_layers for an uneven split, or change the sizes",
    ),
    Rule(
        id="parallel.overlap-param-gather-needs-distopt", source="seed 002 (--overlap-param-gather)",
        reads=("overlap_param_gather", "use_distributed_optimizer"),
        applies=lambda v: bool(v.overlap_param_gather), holds=lambda v: bool(v.use_distributed_optimizer),
        constraint="overlap_param_gather works only with the distributed optimizer",
        fix="add --use-distributed-optimizer, or drop --overlap-param-gather",
    ),
    Rule(
        id="parallel.overlap-grad-reduce-needs-distopt", source="seed 002 (--overlap-grad-reduce)",
        reads=("overlap_grad_reduce", "use_distributed_optimizer"),
        applies=lambda v: bool(v.overlap_grad_reduce), holds=lambda v: bool(v.use_distributed_optimizer),
        constraint="overlap_grad_reduce is only effective with the distributed optimizer (MindSpeed-MM)",
        fix="add --use-distributed-optimizer, or drop --overlap-grad-reduce",
    ),
    Rule(
        id="parallel.first-last-stage-needs-pp", source="seed 003 (decoder_first_pipeline_num_layers)",
        reads=("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers", PP),
        applies=lambda v: v.decoder_first_pipeline_num_layers is not None or v.decoder_last_pipeline_num_layers is not None,
        holds=lambda v: _size(v, PP) > 1,
        constraint="first/last pipeline stage layer counts need pipeline_model_parallel_size > 1",
        fix="raise pipeline_model_parallel_size or drop decoder_first/last_pipeline_num_layers",
    ),
    Rule(
        id="parallel.layout-exclusive", source="Megatron-LM (pipeline_model_parallel_layout)",
        reads=("pipeline_model_parallel_layout", "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"),
        applies=lambda v: v.pipeline_model_parallel_layout is not None,
        holds=lambda v: v.decoder_first_pipeline_num_layers is None and v.decoder_last_pipeline_num_layers is None,
        constraint="pipeline_model_parallel_layout replaces decoder_first/last_pipeline_num_layers",
        fix="use either the layout string or the first/last stage counts",
    ),
    Rule(
        id="parallel.expert-parallel-needs-experts", source="Megatron-LM (validate_args)",
        reads=("expert_model_parallel_size", "num_experts"),
        applies=lambda v: (v.expert_model_parallel_size or 1) > 1,
        holds=lambda v: v.num_experts is not None and v.num_experts % v.expert_model_parallel_size == 0,
        constraint="expert_model_parallel_size needs num_experts divisible by it",
        fix="set num_experts to a multiple of expert_model_parallel_size={expert_model_parallel_size}",
    ),
    Rule(
        id="precision.fp16-bf16-exclusive", source="Megatron-LM (validate_args)",
        reads=("fp16", "bf16"), applies=lambda v: bool(v.fp16), holds=lambda v: not v.bf16,
        constraint="fp16 and bf16 cannot both be on", fix="choose one of --fp16 / --bf16",
    ),
    Rule(
        id="lr.warmup-exclusive", source="Megatron-LM (validate_args)",
        reads=("lr_warmup_fraction", "lr_warmup_iters"),
        applies=lambda v: v.lr_warmup_fraction is not None, holds=lambda v: not v.lr_warmup_iters,
        constraint="lr_warmup_fraction and lr_warmup_iters are mutually exclusive",
        fix="drop one of them",
    ),
)
