"""Which package implements which parameters today (an explicit table, updated as features land).

A parameter missing here is accepted only at its default; set to anything else, validation
reports it as not implemented yet, naming the package that will own it.
"""

from __future__ import annotations

IMPLEMENTED_BY: dict[str, frozenset[str]] = {
    # Issue #6, data part: `mindspeed preprocess` (mindspeed_train.data) implements these. The
    # preprocessing-only flags (--input, --output-prefix, --json-keys, --handler-name, --map-keys,
    # --append-eod) are not schema parameters.
    "mindspeed-train": frozenset({
        "tokenizer_name_or_path",
        "tokenizer_padding_side",
        "tokenizer_not_use_fast",
        "prompt_type",
        "hf_chat_template",
        "no_cut_token",
        "pack",
        "neat_pack",
        "train_on_prompt",
        "mask_history",
        "workers",
        # Issue #6, the loop (first increment): `mindspeed train` (mindspeed_train.launch) with the
        # megatron-core backend, TP x DP, pretraining on indexed datasets, torch_dist checkpoints.
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "expert_model_parallel_size",
        "micro_batch_size",
        "global_batch_size",
        "seq_length",
        "train_iters",
        "data_path",
        "split",
        "seed",
        "make_vocab_size_divisible_by",
        "lr",
        "min_lr",
        "lr_decay_style",
        "lr_decay_iters",
        "lr_warmup_iters",
        "lr_warmup_fraction",
        "lr_warmup_init",
        "weight_decay",
        "clip_grad",
        "adam_beta1",
        "adam_beta2",
        "adam_eps",
        "use_distributed_optimizer",
        "save",
        "save_interval",
        "load",
        "no_load_optim",
        "no_save_optim",
        "no_load_rng",
        "no_save_rng",
        "finetune",
        "log_interval",
        # Model sizes: taken from the HF config (--model); given as flags they must agree with it.
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "max_position_embeddings",
        "num_experts",
        # Issue #6, the loop (second increment): evaluation, TensorBoard, checkpoint rotation (the
        # launcher flag --save-total-limit: the schema spells it only in the fsdp2 dialect), bf16.
        "eval_interval",
        "eval_iters",
        "tensorboard_dir",
        "save_total_limit",
        "bf16",
        # Issue #6, third increment: legacy checkpoints, profiling.
        "ckpt_format",
        "profile",
        "profile_step_start",
        "profile_step_end",
        "profile_ranks",
        "profile_save_path",
        "profile_level",
        "profile_with_cpu",
        "profile_with_memory",
        "profile_record_shapes",
        "profile_with_stack",
        # Issue #6: instruction data in the loop, packed (THD) batches, per-token loss.
        "is_instruction_dataset",
        "reset_attention_mask",
        "variable_seq_lengths",
        "pad_to_multiple_of",
        "no_shuffle",
        "calculate_per_token_loss",
        # Issue #6: sequence parallel, fp16 with loss scaling, recomputation.
        "sequence_parallel",
        "fp16",
        "loss_scale",
        "initial_loss_scale",
        "min_loss_scale",
        "loss_scale_window",
        "hysteresis",
        "recompute_granularity",
        "recompute_method",
        "recompute_num_layers",
        "recompute_norm",
        "recompute_activation_function",
        # mindspeed train always builds megatron-core models; the flag is accepted (the
        # recompute.norm.mcore rule asks for it) and changes nothing.
        "use_mcore_models",
        # Issue #6: virtual pipeline stages (megatron's interleaved 1F1B), torch_dist checkpoints.
        "num_layers_per_virtual_pipeline_stage",
        # Issue #6: the LM and MTP losses through mindspeed_kernels' fused linear cross-entropy
        # (cross_entropy_fusion_impl stays "native": "te" needs TransformerEngine).
        "cross_entropy_loss_fusion",
        # Issue #6: weight gradients added straight into the DDP buffer (megatron's default; the
        # flag turns it off); on CPU/NPU through mindspeed_models.adaptor's stand-in for apex.
        "no_gradient_accumulation_fusion",
        # Issue #7: context parallelism in the loop (mindspeed_parallel.cp through mindspeed_models'
        # FlashAttention): ulysses, megatron ring (double ring, send/recv overlap), hybrid, adaptive
        # and hybrid adaptive, with causal or general (explicit) masks.
        "context_parallel_size",
        "context_parallel_algo",
        "ulysses_degree_in_cp",
        "cp_attention_mask_type",
        "cp_window_size",
        "use_cp_send_recv_overlap",
        "kv_head_repeat_before_uly_alltoall",
        "attention_mask_on_cpu",
        "adaptive_cp_without_coarse",
        "adaptive_cp_dynamic_attn_mask",
        "adaptive_cp_only_reschedule",
        "adaptive_cp_manually_set_mask_list",
        # Issue #7: DualPipeV (mindspeed_parallel.pipeline through mindspeed_train.dualpipe), with
        # the weight-gradient pass of megatron's linear layers deferred in the cooldown.
        "schedules_method",
        "dualpipev_dw_detach",
        # Issue #7: TP-2D (mindspeed_parallel.tp2d layers in mindspeed_models.tp2d decoder layers),
        # with the forward/backward all-gather and reduce-scatter overlap options.
        "tp_2d",
        "tp_x",
        "tp_y",
        "enable_overlap_ag_with_matmul",
        "enable_overlap_matmul_with_rs",
        "enable_backward_overlap_ag_with_matmul",
        # Issue #7: NDMM (mindspeed_parallel.ndmm layers in mindspeed_models.ndmm decoder layers),
        # QKV/fc1 over the nd1 grid and proj/fc2 over the nd2 grid of the TP group.
        "use_nd_matmul",
        "nd1_dim1_size",
        "nd2_dim1_size",
        # megatron's manual garbage collection in the loop (mindspeed_train.garbage).
        "manual_gc",
        "manual_gc_interval",
    }),
}


def implementer(name: str) -> str | None:
    """The distribution that implements ``name``, or None."""
    return next((dist for dist, names in IMPLEMENTED_BY.items() if name in names), None)
