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
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from mindspeed_train import aux_losses, ckpt, context, garbage
from mindspeed_train.config import TrainConfig
from mindspeed_train.metrics import MetricsLog, StepMetrics
from mindspeed_train.profiling import TrainProfiler


@dataclass
class Job:
    """Everything a running job holds. ``iteration``/``consumed_samples`` advance per step."""

    config: TrainConfig
    chunks: list  # megatron DistributedDataParallel around each GPTModel chunk (one per virtual stage)
    optimizer: object
    scheduler: object
    spec: object  # mindspeed_models.ModelSpec
    iteration: int = 0
    consumed_samples: int = 0
    cp: object | None = None  # mindspeed_models.context_parallel.ContextParallel when context_parallel_size > 1

    @property
    def model(self):
        """The DDP-wrapped model of a run without virtual pipeline stages (its only chunk)."""
        if len(self.chunks) != 1:
            raise AttributeError(f"this job has {len(self.chunks)} virtual-pipeline model chunks; use job.chunks")
        return self.chunks[0]


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
    kwargs = dict(tensor_model_parallel_size=layout.tensor, pipeline_model_parallel_size=layout.pipeline,
                  virtual_pipeline_model_parallel_size=layout.virtual, context_parallel_size=layout.context,
                  expert_model_parallel_size=layout.expert)  # fmt: skip
    if layout.schedule == "dualpipev":  # two V-shaped chunks per rank: mindspeed_train.dualpipe
        from mindspeed_train import dualpipe

        kwargs.update(dualpipe.parallel_state_kwargs(config))
    ps.initialize_model_parallel(**kwargs)
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
    from mindspeed_models.adaptor import grad_accum_fusion_available
    from mindspeed_models.context_parallel import enable_context_parallel
    from mindspeed_train.optim import build_optimizer, build_scheduler

    layout, precision = config.parallel, config.precision
    dtype = torch.bfloat16 if precision.bf16 else torch.float16 if precision.fp16 else torch.float32
    spec = mm.from_hf_config(
        config.model, tensor_model_parallel_size=layout.tensor, pipeline_model_parallel_size=layout.pipeline,
        expert_model_parallel_size=layout.expert, virtual_pipeline_model_parallel_size=layout.virtual,
        sequence_parallel=layout.sequence_parallel, context_parallel_size=layout.context, params_dtype=dtype,
        pipeline_dtype=dtype, bf16=precision.bf16, fp16=precision.fp16,
        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
        calculate_per_token_loss=config.per_token_loss, cross_entropy_loss_fusion=config.loss_fusion,
        # as megatron's arguments do: on unless turned off, and only where the linears can fuse
        gradient_accumulation_fusion=config.grad_accum_fusion and grad_accum_fusion_available(),
        # pipeline stages exchange each microbatch's shape first (megatron's p2p) only when it varies
        variable_seq_lengths=config.data.variable and layout.pipeline > 1,
        **config.recompute.megatron_kwargs(),
    )  # fmt: skip
    if layout.tp_2d:  # decoder layers over a tp_x x tp_y grid of megatron's TP group (mindspeed_models.tp2d)
        from mindspeed_models.tp2d import enable_tp2d, make_settings

        grid = make_settings(ps.get_tensor_model_parallel_group(), layout.tp_x, layout.tp_y, layout.tp2d_overlap)
        spec = enable_tp2d(spec, grid)
    if layout.nd_matmul:  # NDMM decoder layers over two grids of megatron's TP group (mindspeed_models.ndmm)
        from mindspeed_models.ndmm import enable_ndmm, make_ndmm_settings

        spec = enable_ndmm(spec, make_ndmm_settings(ps.get_tensor_model_parallel_group(), *layout.nd_matmul))
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=config.optim.distributed_optimizer
    )
    aux_losses.reset()
    cp = context.build(config)
    if layout.schedule == "dualpipev":  # the V layout's two chunks per rank: mindspeed_train.dualpipe
        from mindspeed_train import dualpipe

        spec, models = dualpipe.build_models(config, spec)
        finalize = None  # dualpipe.schedule finalises the grads itself
    else:
        models, finalize = [], finalize_model_grads
        for stage in range(layout.virtual or 1):
            vp = stage if layout.virtual else None
            models.append(mm.build_model(spec, pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                                         post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                                         vp_stage=vp))  # fmt: skip
    chunks = []
    for stage, model in enumerate(models):
        if cp is not None:
            enable_context_parallel(model, cp)
        if dtype != torch.float32:
            # Casts the first stage's inputs to bf16/fp16 and the last stage's output (per-token loss) to fp32.
            model = Float16Module(spec.config, model)
        # megatron buckets only the first chunk's gradients (the others are reduced as one bucket each)
        chunks.append(DistributedDataParallel(spec.config, ddp_config, model, disable_bucketing=stage > 0))
    # The schedule defers the DP reduction to the last microbatch and then finalises the grads.
    spec.config.no_sync_func = chunks[0].no_sync if len(chunks) == 1 else [c.no_sync for c in chunks]
    spec.config.finalize_model_grads_func = finalize
    optimizer = build_optimizer(config.optim, chunks, precision)
    # megatron scales the loss (and the MoE/MTP auxiliary losses) by the fp16 loss scale
    spec.config.grad_scale_func = optimizer.scale_loss if precision.fp16 else None
    scheduler = build_scheduler(config.optim, optimizer, config.batch.global_)
    job = Job(config=config, chunks=chunks, optimizer=optimizer, scheduler=scheduler, spec=spec, cp=cp)
    return dualpipe.as_job(job) if layout.schedule == "dualpipev" else job


def _loss_func(loss_mask: torch.Tensor, per_token: bool, cp_group, output: torch.Tensor):
    """Loss of one microbatch over its loss mask: the token mean, or with ``per_token``
    (``--calculate-per-token-loss``) the token sum and count, which megatron sums over the global
    batch and divides by the total count (``finalize_model_grads`` scales the gradients).
    ``cp_group``: the sequence is split over it (see :mod:`mindspeed_train.context`)."""
    if cp_group is not None and not per_token:
        loss, report = context.loss(loss_mask, output, cp_group)
        return loss, {"lm loss": report}
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(output.reshape(-1).float() * mask)
    if per_token:
        count = mask.sum().to(torch.int)
        return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}
    loss = total / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}


def _packed_inputs(batch: dict) -> tuple[dict, object]:
    """A batch with ``segments`` as one THD row (``[1, micro x S]``) and its PackedSeqParams, so
    attention stays inside each segment (megatron's packed-sequence path)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from mindspeed_train.data.sft import thd_layout

    cu, longest = thd_layout(batch["segments"])
    flat = {key: value.reshape(1, -1) for key, value in batch.items() if key != "segments"}
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                             max_seqlen_kv=longest)  # fmt: skip
    return flat, params


def _forward_step(per_token: bool, cp, data_iterator, model):
    batch, packed = next(data_iterator), None
    if cp is not None and "segments" in batch:  # padded per sequence and split per sequence (see mindspeed_train.context)
        batch, packed = context.split_packed_batch(batch, cp)
    elif cp is not None:
        batch = context.split_batch(batch, cp)
    elif "segments" in batch:
        batch, packed = _packed_inputs(batch)
    # packed under CP: the MTP loss skips the padding (its default mask is all ones)
    extra = {"loss_mask": batch["real_mask"]} if "real_mask" in batch else {}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=packed, **extra)
    return output, partial(_loss_func, batch["loss_mask"], per_token, cp.groups.cp if cp is not None else None)


def _reduce_loss(store: list[dict]) -> float:
    """The step's loss for the log: the mean of the microbatch losses averaged over the DP group
    (per-token loss: total masked-token loss / total tokens over the global batch). Only the last
    pipeline stage has them, so a sum over the PP group hands the value to every rank."""
    from megatron.core import parallel_state as ps

    if store and store[0]["lm loss"].numel() == 2:
        pair = torch.stack([entry["lm loss"] for entry in store]).sum(dim=0).double()
        _all_reduce(pair, ps.get_data_parallel_group(with_context_parallel=True))
        total = (pair[0] / pair[1].clamp(min=1)).reshape(1)
    else:
        total = torch.stack([entry["lm loss"] for entry in store]).mean() if store else torch.zeros(())
        total = total.reshape(1).double() / ps.get_data_parallel_world_size()
        _all_reduce(total, ps.get_data_parallel_group())
    _all_reduce(total, ps.get_pipeline_model_parallel_group())
    return float(total.item())


def _all_reduce(tensor: torch.Tensor, group) -> None:
    if dist.get_world_size(group) > 1:  # (a one-rank collective still costs a gloo round trip)
        dist.all_reduce(tensor, group=group)


def _schedule(job: Job, data_iterator, forward_only: bool) -> list[dict]:
    """megatron's forward/backward schedule over one global batch. Packed (THD) microbatches
    travel between pipeline stages as ``[micro x S, 1, H]``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if job.config.parallel.schedule == "dualpipev":  # mindspeed-parallel's DualPipeV executor
        from mindspeed_train import dualpipe

        return dualpipe.schedule(job, data_iterator, forward_only)
    batch = job.config.batch
    seq, micro = (batch.seq_length * batch.micro, 1) if job.config.data.packed else (batch.seq_length, batch.micro)
    step = partial(_forward_step, job.config.per_token_loss, job.cp)
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=data_iterator, model=job.chunks, num_microbatches=batch.num_microbatches,
        seq_length=seq, micro_batch_size=micro, forward_only=forward_only,
    )  # fmt: skip


class StepResult(NamedTuple):
    """What one optimizer step reports: the logged loss, the grad norm before clipping (nan when
    clipping is off and megatron skips the norm), and for fp16 the loss scale and whether the
    update was skipped because the scaled gradients overflowed."""

    loss: float
    grad_norm: float
    loss_scale: float | None = None
    skipped: bool = False
    aux: dict | None = None  # MoE balancing / z-losses and MTP losses (see mindspeed_train.aux_losses)


def train_step(job: Job, data_iterator) -> StepResult:
    """One optimizer step over the global batch. An overflowing fp16 step is skipped as megatron
    does (no update, no scheduler step; the iteration still counts); a failed update in bf16/fp32
    is an error."""
    for chunk in job.chunks:
        chunk.zero_grad_buffer()
    job.optimizer.zero_grad()
    store = _schedule(job, data_iterator, forward_only=False)
    aux = aux_losses.collect(job.spec.config, job.config.batch.num_microbatches)
    ok, grad_norm, _ = job.optimizer.step()
    fp16 = job.config.precision.fp16
    if not ok and not fp16:
        raise RuntimeError(f"iteration {job.iteration + 1}: the optimizer step failed (non-finite gradients)")
    if ok:
        job.scheduler.step(increment=job.config.batch.global_)
    return StepResult(loss=_reduce_loss(store), grad_norm=float("nan") if grad_norm is None else float(grad_norm),
                      loss_scale=float(job.optimizer.get_loss_scale()) if fp16 else None, skipped=not ok,
                      aux=aux or None)  # fmt: skip


def evaluate(job: Job, valid_iterator, eval_iters: int) -> float:
    """Token-mean validation loss: the mean over ``eval_iters`` global batches (forward only, no
    gradients) of the DP-averaged mean microbatch loss, as megatron's ``evaluate`` reports it."""
    losses = []
    for chunk in job.chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            for _ in range(eval_iters):
                # (megatron's routers and MTP record auxiliary losses only in training mode)
                losses.append(_reduce_loss(_schedule(job, valid_iterator, forward_only=True)))
    finally:
        for chunk in job.chunks:
            chunk.train()
    return sum(losses) / len(losses)


def _peak_memory_mb() -> float:
    from mindspeed_kernels import accelerator

    return accelerator.memory_stats().peak_bytes / 2**20


def _current_lr(job: Job) -> float:
    return float(job.optimizer.param_groups[0]["lr"])


def run(job: Job, data_iterator, log: MetricsLog, valid_iterator=None, eval_iters: int = 0) -> list[StepMetrics]:
    """Train from ``job.iteration`` to ``train_iters``, evaluating every ``eval.interval`` (when
    ``valid_iterator`` is given) and saving every ``save_interval`` and at the end."""
    steps: list[StepMetrics] = []
    profiler = TrainProfiler(job.config.profile, dist.get_rank(), start_iteration=job.iteration)
    try:
        with garbage.manual_collection(job.config.gc):
            while job.iteration < job.config.train_iters:
                step = _step_and_evaluate(job, data_iterator, valid_iterator, eval_iters)
                steps.append(step)
                log.record(step)
                if _should_save(job.config, job.iteration):
                    save(job)
                profiler.step(job.iteration)  # after the save, where megatron stops its profiler
                garbage.after_iteration(job.config.gc, job.iteration)
    finally:
        profiler.close()
    log.close()
    return steps


def _step_and_evaluate(job: Job, data_iterator, valid_iterator, eval_iters: int) -> StepMetrics:
    """One training step (and the evaluation due after it) as the metrics of that iteration."""
    config = job.config
    start = time.monotonic()
    result = train_step(job, data_iterator)
    job.iteration += 1
    job.consumed_samples += config.batch.global_
    seconds = time.monotonic() - start
    interval = config.eval.interval if valid_iterator is not None and eval_iters > 0 else None
    eval_loss = None
    if interval and job.iteration % interval == 0:
        with garbage.around_evaluation(config.gc):
            eval_loss = evaluate(job, valid_iterator, eval_iters)
    tokens = config.batch.global_ * config.batch.seq_length
    return StepMetrics(iteration=job.iteration, loss=result.loss, lr=_current_lr(job), grad_norm=result.grad_norm,
                       seconds=seconds, tokens_per_s=tokens / max(seconds, 1e-9), consumed_samples=job.consumed_samples,
                       eval_loss=eval_loss, memory_mb=_peak_memory_mb(), loss_scale=result.loss_scale,
                       skipped=result.skipped, aux=result.aux)  # fmt: skip


def _should_save(config: TrainConfig, iteration: int) -> bool:
    if not config.ckpt.save:
        return False
    interval = config.ckpt.save_interval
    return iteration == config.train_iters or bool(interval and iteration % interval == 0)


def save(job: Job) -> str:
    return ckpt.save_checkpoint(job.config.ckpt, job.chunks, job.optimizer, job.scheduler, iteration=job.iteration,
                                consumed_samples=job.consumed_samples, hf_config=_plain(job.spec.hf_config),
                                tokenizer=job.config.tokenizer)  # fmt: skip


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
    loaded = ckpt.load_checkpoint(job.config.ckpt, job.chunks, job.optimizer, job.scheduler)
    if loaded is not None:
        job.iteration, job.consumed_samples = loaded.iteration, loaded.consumed_samples
