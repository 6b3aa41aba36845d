"""RLHF and export rules of Megatron-SWIFT (seed 003), with TRL's GRPO batch constraints."""

from __future__ import annotations

from mindspeed_args.rules.base import Rule

S = "seed 003"


def _grpo(v) -> bool:
    return v.rlhf_type == "grpo"


RULES: tuple[Rule, ...] = (
    Rule(
        id="grpo.generation-batch-exclusive", source=f"{S} GRPO (TRL GRPOConfig)",
        reads=("rlhf_type", "generation_batch_size", "steps_per_generation"),
        applies=lambda v: _grpo(v) and v.generation_batch_size is not None,
        holds=lambda v: v.steps_per_generation in (None, 1),
        constraint="set either generation_batch_size or steps_per_generation, not both",
        fix="drop one of them",
    ),
    Rule(
        id="grpo.num-generations", source=f"{S} GRPO (TRL GRPOConfig)",
        reads=("rlhf_type", "num_generations"),
        applies=_grpo, holds=lambda v: (v.num_generations or 0) >= 2,
        constraint="GRPO compares completions within a group: num_generations must be at least 2",
        fix="set num_generations 2 or more (8 is the default)",
    ),
    Rule(
        id="grpo.generation-batch-divisible", source=f"{S} GRPO (TRL GRPOConfig)",
        reads=("rlhf_type", "generation_batch_size", "global_batch_size", "steps_per_generation", "num_generations"),
        applies=lambda v: _grpo(v) and bool(v.num_generations),
        holds=lambda v: ((v.generation_batch_size or (v.global_batch_size or 0) * (v.steps_per_generation or 1))
                         % v.num_generations == 0),
        constraint="the generation batch ({g}) must be a multiple of num_generations",
        fix="make generation_batch_size (or global_batch_size x steps_per_generation) a multiple of {num_generations}",
        extra=lambda v: {"g": v.generation_batch_size or (v.global_batch_size or 0) * (v.steps_per_generation or 1)},
    ),
    Rule(
        id="grpo.epsilon-high", source=f"{S} GRPO (epsilon_high)",
        reads=("grpo_epsilon", "epsilon_high"),
        applies=lambda v: v.epsilon_high is not None and v.grpo_epsilon is not None,
        holds=lambda v: v.epsilon_high >= v.grpo_epsilon,
        constraint="epsilon_high (the upper clip) must be at least epsilon",
        fix="set epsilon_high >= {grpo_epsilon}",
    ),
    Rule(
        id="grpo.vllm-server-address", source=f"{S} GRPO (vllm_mode)",
        reads=("vllm_mode", "vllm_server_host", "vllm_server_base_url"),
        applies=lambda v: v.vllm_mode == "server",
        holds=lambda v: v.vllm_server_host is not None or v.vllm_server_base_url is not None,
        constraint="vllm_mode server needs vllm_server_host or vllm_server_base_url",
        fix="set --vllm_server_host (and port) or --vllm_server_base_url",
    ),
    Rule(
        id="gkd.teacher-required", source=f"{S} GKD (teacher_model)",
        reads=("rlhf_type", "teacher_model"),
        applies=lambda v: v.rlhf_type == "gkd", holds=lambda v: v.teacher_model is not None,
        constraint="GKD distils from a teacher: teacher_model is required", fix="set --teacher_model PATH",
    ),
    Rule(
        id="export.direction", source=f"{S} export (to_mcore / to_hf)",
        reads=("to_mcore", "to_hf"), applies=lambda v: bool(v.to_mcore), holds=lambda v: not v.to_hf,
        constraint="to_mcore and to_hf are opposite directions", fix="set only one of them",
    ),
    Rule(
        id="optimizer.offload-needs-precision-aware", source=f"{S} (optimizer_cpu_offload)",
        reads=("optimizer_cpu_offload", "use_precision_aware_optimizer"),
        applies=lambda v: bool(v.optimizer_cpu_offload), holds=lambda v: bool(v.use_precision_aware_optimizer),
        constraint="optimizer_cpu_offload runs through the precision-aware optimizer",
        fix="add use_precision_aware_optimizer true",
    ),
    Rule(
        id="optimizer.sgd-momentum", source=f"{S} (sgd_momentum)",
        reads=("sgd_momentum", "optimizer"),
        applies=lambda v: v.sgd_momentum not in (None, 0.9), holds=lambda v: v.optimizer == "sgd",
        constraint="sgd_momentum takes effect only with optimizer sgd", fix="set optimizer sgd, or drop sgd_momentum",
    ),
    Rule(
        id="env.device-connections-sequence-parallel", source="seed 002 (CUDA_DEVICE_MAX_CONNECTIONS)",
        reads=("sequence_parallel", "cuda_device_max_connections"),
        applies=lambda v: bool(v.sequence_parallel) and v.cuda_device_max_connections is not None,
        holds=lambda v: v.cuda_device_max_connections == 1,
        constraint="with sequence parallelism CUDA_DEVICE_MAX_CONNECTIONS must be 1",
        fix="export CUDA_DEVICE_MAX_CONNECTIONS=1",
    ),
)
