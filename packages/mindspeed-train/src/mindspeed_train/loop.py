"""The megatron-core training loop: model, DDP, optimizer, schedule, data, checkpoints, metrics.

One step = megatron's forward/backward schedule over ``num_microbatches`` microbatches (gradient
accumulation to the global batch; megatron's DDP reduces the gradients over DP in
``finalize_model_grads``), then ``optimizer.step()`` (clipping inside) and ``scheduler.step()``.
The loss of a microbatch is the mean over its loss-masked tokens; the schedule divides it by the
number of microbatches, so the gradient is that of the mean of the microbatch losses over the global
batch. MoE auxiliary losses and the MTP loss add their gradients inside megatron, as in mindspeed-models.

Evaluation runs the same schedule with ``forward_only=True`` over ``eval_iters`` global batches of the
validation split. ``--bf16`` wraps the model in megatron's ``Float16Module`` (bf16 weights and compute,
fp32 loss) and gives the optimizer fp32 main parameters, as megatron's ``get_model`` and
``get_megatron_optimizer`` do with ``bf16=True``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from mindspeed_train import ckpt
from mindspeed_train.config import TrainConfig
from mindspeed_train.metrics import MetricsLog, StepMetrics


@dataclass
class Job:
    """Everything a running job holds. ``iteration``/``consumed_samples`` advance per step."""

    config: TrainConfig
    model: object  # megatron DistributedDataParallel around the GPTModel
    optimizer: object
    scheduler: object
    spec: object  # mindspeed_models.ModelSpec
    iteration: int = 0
    consumed_samples: int = 0


def init_parallel(config: TrainConfig) -> None:
    """megatron's parallel state for this layout, and every RNG seeded (same seed on all ranks:
    with host-side initialisation each TP shard is cut from the same full weight)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from mindspeed_models import adaptor

    adaptor.install()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    layout = config.parallel
    ps.initialize_model_parallel(tensor_model_parallel_size=layout.tensor, pipeline_model_parallel_size=layout.pipeline,
                                 expert_model_parallel_size=layout.expert)  # fmt: skip
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    model_parallel_cuda_manual_seed(config.seed, force_reset_rng=True)


def build_job(config: TrainConfig) -> Job:
    """Model from the HF config, wrapped in megatron DDP, its optimizer and LR scheduler."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    import mindspeed_models as mm
    from mindspeed_train.optim import build_optimizer, build_scheduler

    layout = config.parallel
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    spec = mm.from_hf_config(
        config.model, tensor_model_parallel_size=layout.tensor, pipeline_model_parallel_size=layout.pipeline,
        expert_model_parallel_size=layout.expert, params_dtype=dtype, pipeline_dtype=dtype, bf16=config.bf16,
        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
    )  # fmt: skip
    model = mm.build_model(spec, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    if config.bf16:
        # Casts the first stage's inputs to bf16 and the last stage's output (per-token loss) to fp32.
        model = Float16Module(spec.config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=config.optim.distributed_optimizer
    )
    ddp = DistributedDataParallel(spec.config, ddp_config, model)
    # The schedule defers the DP reduction to the last microbatch and then finalises the grads.
    spec.config.no_sync_func = ddp.no_sync
    spec.config.finalize_model_grads_func = finalize_model_grads
    optimizer = build_optimizer(config.optim, [ddp], bf16=config.bf16)
    scheduler = build_scheduler(config.optim, optimizer, config.batch.global_)
    return Job(config=config, model=ddp, optimizer=optimizer, scheduler=scheduler, spec=spec)


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Token-mean loss of one microbatch over its loss mask."""
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(output.reshape(-1).float() * mask) / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _reduce_loss(store: list[dict]) -> float:
    """Mean of the microbatch losses, averaged over the DP group; only the last pipeline stage has
    them, so a sum over the PP group hands the value to every rank."""
    from megatron.core import parallel_state as ps

    total = torch.stack([entry["lm loss"] for entry in store]).mean() if store else torch.zeros(())
    total = total.reshape(1).double() / ps.get_data_parallel_world_size()
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return float(total.item())


def train_step(job: Job, data_iterator) -> tuple[float, float]:
    """One optimizer step over the global batch; returns (loss, grad norm before clipping)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch = job.config.batch
    job.model.zero_grad_buffer()
    job.optimizer.zero_grad()
    store = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=data_iterator, model=[job.model],
        num_microbatches=batch.num_microbatches, seq_length=batch.seq_length, micro_batch_size=batch.micro,
        forward_only=False,
    )  # fmt: skip
    ok, grad_norm, _ = job.optimizer.step()
    if not ok:
        raise RuntimeError(f"iteration {job.iteration + 1}: the optimizer step failed (non-finite gradients)")
    job.scheduler.step(increment=batch.global_)
    # grad_norm is None when clipping is off (--clip-grad 0): megatron then skips the norm.
    return _reduce_loss(store), float("nan") if grad_norm is None else float(grad_norm)


def evaluate(job: Job, valid_iterator, eval_iters: int) -> float:
    """Token-mean validation loss: the mean over ``eval_iters`` global batches (forward only, no
    gradients) of the DP-averaged mean microbatch loss, as megatron's ``evaluate`` reports it."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, losses = job.config.batch, []
    job.model.eval()
    try:
        with torch.no_grad():
            for _ in range(eval_iters):
                store = get_forward_backward_func()(
                    forward_step_func=_forward_step, data_iterator=valid_iterator, model=[job.model],
                    num_microbatches=batch.num_microbatches, seq_length=batch.seq_length,
                    micro_batch_size=batch.micro, forward_only=True,
                )  # fmt: skip
                losses.append(_reduce_loss(store))
    finally:
        job.model.train()
    return sum(losses) / len(losses)


def _current_lr(job: Job) -> float:
    return float(job.optimizer.param_groups[0]["lr"])


def run(job: Job, data_iterator, log: MetricsLog, valid_iterator=None, eval_iters: int = 0) -> list[StepMetrics]:
    """Train from ``job.iteration`` to ``train_iters``, evaluating every ``eval.interval`` (when
    ``valid_iterator`` is given) and saving every ``save_interval`` and at the end."""
    config, steps = job.config, []
    interval = config.eval.interval if valid_iterator is not None and eval_iters > 0 else None
    tokens = config.batch.global_ * config.batch.seq_length
    while job.iteration < config.train_iters:
        start = time.monotonic()
        loss, grad_norm = train_step(job, data_iterator)
        job.iteration += 1
        job.consumed_samples += config.batch.global_
        seconds = time.monotonic() - start
        eval_loss = None
        if interval and job.iteration % interval == 0:
            eval_loss = evaluate(job, valid_iterator, eval_iters)
        step = StepMetrics(iteration=job.iteration, loss=loss, lr=_current_lr(job), grad_norm=grad_norm,
                           seconds=seconds, tokens_per_s=tokens / max(seconds, 1e-9),
                           consumed_samples=job.consumed_samples, eval_loss=eval_loss)  # fmt: skip
        steps.append(step)
        log.record(step)
        if _should_save(config, job.iteration):
            save(job)
    log.close()
    return steps


def _should_save(config: TrainConfig, iteration: int) -> bool:
    if not config.ckpt.save:
        return False
    interval = config.ckpt.save_interval
    return iteration == config.train_iters or bool(interval and iteration % interval == 0)


def save(job: Job) -> str:
    return ckpt.save_checkpoint(job.config.ckpt, job.model, job.optimizer, job.scheduler, iteration=job.iteration,
                                consumed_samples=job.consumed_samples, hf_config=_plain(job.spec.hf_config))  # fmt: skip


def _plain(value):
    """A read-only (nested) mapping as plain JSON-able dicts and lists."""
    if hasattr(value, "items"):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def resume(job: Job) -> None:
    """Apply ``--load`` (when set and it holds a committed checkpoint)."""
    if not job.config.ckpt.load:
        return
    loaded = ckpt.load_checkpoint(job.config.ckpt, job.model, job.optimizer, job.scheduler)
    if loaded is not None:
        job.iteration, job.consumed_samples = loaded.iteration, loaded.consumed_samples
