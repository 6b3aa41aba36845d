"""megatron-core's optimizer (Adam, optionally the distributed optimizer) and LR/WD schedule.

Weight decay follows megatron's default grouping: biases and 1-D parameters (norm weights) get none.
The schedule counts in samples, as megatron's training loop does with ``--train-iters``: every
length is iterations x global batch and each step advances it by one global batch, so checkpoints
carry the same scheduler state megatron writes.
"""

from __future__ import annotations

import torch

from mindspeed_train.config import OptimSettings, PrecisionSettings


def build_optimizer(settings: OptimSettings, model_chunks: list, precision: PrecisionSettings | None = None):
    """``get_megatron_optimizer`` over the DDP-wrapped ``model_chunks``: fp32 parameters, or
    bf16/fp16 parameters with fp32 main parameters (and fp32 grads) in the optimizer; fp16 with
    megatron's constant or dynamic loss scaler (see :class:`PrecisionSettings`)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    precision = precision or PrecisionSettings()
    dtype = torch.bfloat16 if precision.bf16 else torch.float16 if precision.fp16 else torch.float32
    config = OptimizerConfig(
        optimizer="adam", lr=settings.lr, min_lr=settings.min_lr, weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad, use_distributed_optimizer=settings.distributed_optimizer,
        bf16=precision.bf16, fp16=precision.fp16, params_dtype=dtype, loss_scale=precision.loss_scale,
        initial_loss_scale=precision.initial_loss_scale, min_loss_scale=precision.min_loss_scale,
        loss_scale_window=precision.loss_scale_window, hysteresis=precision.hysteresis,
    )  # fmt: skip
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(settings: OptimSettings, optimizer, global_batch: int):
    """megatron's ``OptimizerParamScheduler``: warmup from ``lr_warmup_init`` to ``lr`` over the
    warmup iterations, then ``lr_decay_style`` down to ``min_lr`` at ``lr_decay_iters``; constant WD."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay = settings.lr_decay_iters * global_batch
    return OptimizerParamScheduler(
        optimizer, init_lr=settings.lr_warmup_init, max_lr=settings.lr, min_lr=settings.min_lr,
        lr_warmup_steps=settings.lr_warmup_iters * global_batch, lr_decay_steps=decay,
        lr_decay_style=settings.lr_decay_style, start_wd=settings.weight_decay, end_wd=settings.weight_decay,
        wd_incr_steps=decay, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False,
    )  # fmt: skip
