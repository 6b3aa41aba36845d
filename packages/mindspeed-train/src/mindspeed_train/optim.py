"""megatron-core's optimizer (Adam, optionally the distributed optimizer) and LR/WD schedule.

Weight decay follows megatron's default grouping: biases and 1-D parameters (norm weights) get none.
The update runs as torch's fused AdamW kernel on CPU and CUDA: without apex/TransformerEngine megatron
falls back to torch's AdamW, whose default on CPU is a per-tensor loop of ~10 elementwise passes (about
4x slower for a small model). Other devices keep torch's default: torch lists PrivateUse1 (the NPU)
among the fused-kernel devices, but whether the kernel exists there is up to its backend.
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
    optimizer = get_megatron_optimizer(config, model_chunks)
    for inner in inner_optimizers(optimizer):
        _use_fused_kernel(inner)
        # a loaded state dict brings its own param-group flags (and step tensors) back: fuse again
        inner.register_load_state_dict_post_hook(_use_fused_kernel)
    return optimizer


def inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside megatron's wrapper (one per chained part)."""
    return [part.optimizer for part in getattr(optimizer, "chained_optimizers", [optimizer])]


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch itself ships _fused_adamw_ (cpu since torch 2.4)


def _fused_devices() -> tuple[str, ...]:
    try:  # torch's own list of devices with fused optimizer kernels
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return ()
    return tuple(d for d in _get_fused_kernels_supported_devices() if d in FUSED_ADAMW_DEVICES)


def _use_fused_kernel(inner: torch.optim.Optimizer) -> None:
    """Switch torch Adam(W) param groups to ``fused=True`` when every parameter sits on a device
    with the fused kernel; each parameter's ``step`` then becomes its own float32 tensor on the
    parameter's device, as the fused kernel requires (torch's foreach/fused paths add to every step
    tensor once: a step shared between parameters would be counted once per parameter)."""
    if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
        return
    devices = _fused_devices()
    for group in inner.param_groups:
        if group.get("foreach") or group.get("differentiable"):
            continue
        if not all(p.device.type in devices and p.is_floating_point() for p in group["params"]):
            continue
        group["fused"] = True
        for p in group["params"]:
            state = inner.state.get(p)
            if state and "step" in state:
                state["step"] = set_step_tensor(state["step"], p, fused=True)


def set_step_tensor(step, param: torch.Tensor, fused: bool) -> torch.Tensor:
    """Adam's per-parameter ``step`` for ``param``: its own tensor, float32 on the parameter's device
    for the fused kernel, a float32 CPU scalar otherwise (torch's layouts)."""
    value = float(step)
    return torch.tensor(value, dtype=torch.float32, device=param.device if fused else "cpu")


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
