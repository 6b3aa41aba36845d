"""``--schedules-method dualpipev``: megatron-core GPT chunks run by mindspeed-parallel's DualPipeV.

Layout (the V). The model's ``num_layers`` split into ``2 x PP`` blocks of ``L`` layers; pipeline rank
``r`` holds block ``r`` (its first chunk) and block ``2PP-1-r`` (its second), so the embedding (block 0)
and the final norm, output layer and loss (block ``2PP-1``) both live on pipeline rank 0. megatron knows
two model chunks per rank as virtual pipeline stages, but places virtual stage ``v`` of rank ``r`` at
block ``v x PP + r``. The second chunk is therefore built (and later asked for its checkpoint keys) with
a pipeline group whose ``rank()`` is the mirrored ``PP-1-r``: megatron's own layer offset then gives
``PP x L + (PP-1-r) x L = (2PP-1-r) x L``, and the chunk's global layer numbers, its sharded-checkpoint
keys and its first/last-stage checks follow (a torch_dist checkpoint of any other layout loads).

Boundaries carry one tensor: chunk 0 takes ``stack([tokens, position_ids])`` ``[2, micro, S]`` (int64);
every chunk hands ``[S, micro, H]`` hidden states on. The last chunk's per-token loss needs the labels,
which DualPipeV gives only to its ``loss_fn``; so the executor sees that chunk as the identity and
``loss_fn`` runs it (set_input_tensor + forward with labels, tokens and positions) — the same autograd
graph, on rank 0. Multi-token prediction lives in that chunk (megatron puts MTP on the last stage):
its layers embed the shifted tokens, which rank 0 has, with the chunk's own copy of the embedding.

Gradients: the executor scales each micro-batch loss by ``1/N`` (megatron's mean over micro-batches),
and the MoE auxiliary and MTP losses get the same ``1/N`` through megatron's autoscalers. Tied
embeddings or MTP keep two copies of the word embedding on rank 0 (chunk 0's embedding; the last
chunk's output layer or MTP embedding, as megatron does for first/last stages): the copy starts equal
and the gradients are summed before megatron's ``finalize_model_grads`` reduces over DP and updates
the routers' expert biases; megatron's embedding group holds only pipeline rank 0, so it adds nothing.
Weight-gradient deferral (DualPipeV's W slots, and with ``--dualpipev-dw-detach`` the
cooldown's too) applies to megatron's Column/RowParallelLinear layers whose backward needs no
tensor-parallel communication; the others compute dW during B, which is still exact.

Context parallelism: each micro-batch is split for this CP rank (``mindspeed_train.context``) before
it enters the V, the chunks attend through the CP algorithm, and the loss is the sequence's token
mean (local sum / global count, times the cp size as megatron's forward step does, DDP averaging over
the data x context ranks).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mindspeed_train.config import TrainConfig
from mindspeed_train.loop import Job, _loss_func


@dataclass
class DualPipeVJob(Job):
    """A ``Job`` whose ``chunks`` are ``[chunk r, chunk 2PP-1-r]`` of the V (see module docstring)."""

    linears: tuple = ()  # megatron linear layers that can defer dW (their ``_forward_impl`` is ours)


# -- parallel state ------------------------------------------------------------------------------


def _first_stage_only(pp_ranks, *unused) -> list[int]:
    # embedding and output layer are both on pipeline rank 0: no cross-stage embedding group
    return [pp_ranks[0]]


def parallel_state_kwargs(config: TrainConfig) -> dict:
    """What ``loop.init_parallel`` adds to megatron's ``initialize_model_parallel`` for the V: two
    virtual stages per rank, the embedding group on pipeline rank 0 alone."""
    check_config(config)
    return dict(virtual_pipeline_model_parallel_size=2, get_embedding_ranks=_first_stage_only,
                get_position_embedding_ranks=_first_stage_only)  # fmt: skip


def check_config(config: TrainConfig) -> None:
    """Refuse what the DualPipeV path does not implement (one-line ValueErrors naming the flag)."""
    layout = config.parallel
    if layout.pipeline < 2:
        raise ValueError("--schedules-method dualpipev needs --pipeline-model-parallel-size >= 2")
    if layout.virtual:
        raise ValueError("--schedules-method dualpipev builds its own 2 chunks per rank; "
                         "drop --num-layers-per-virtual-pipeline-stage")
    if config.data.packed:
        raise ValueError("--schedules-method dualpipev with packed (THD) batches is not implemented; "
                         "drop --reset-attention-mask / --neat-pack")  # fmt: skip
    if config.ckpt.format == "torch" and (config.ckpt.save or config.ckpt.load):
        raise ValueError("--schedules-method dualpipev with --ckpt-format torch (legacy) is not implemented; "
                         "use --ckpt-format torch_dist")  # fmt: skip
    if config.batch.num_microbatches < 2 * layout.pipeline:
        raise ValueError(f"--schedules-method dualpipev needs >= 2 x PP = {2 * layout.pipeline} micro-batches per step, got "
                         f"{config.batch.num_microbatches}; raise --global-batch-size")  # fmt: skip


# -- building the V ------------------------------------------------------------------------------


class _MirroredGroup:
    """The pipeline group as the second leg of the V sees it: ``rank()`` is ``PP-1-r`` (see the
    module docstring); everything else is the real group's."""

    def __init__(self, group, rank: int) -> None:
        self._group, self._rank = group, rank

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._group.size()

    def __getattr__(self, name):
        return getattr(self._group, name)


@contextmanager
def _pipeline_rank_view(rank: int):
    """While building a chunk: megatron's pipeline group and rank read as ``rank``. The model keeps
    the group object it saw (ProcessGroupCollection.pp) for its layer offsets later on."""
    from megatron.core import parallel_state as ps

    # megatron has a setter for the rank but none for the group (ProcessGroupCollection reads the global)
    group, forced = ps._PIPELINE_MODEL_PARALLEL_GROUP, ps._MPU_PIPELINE_MODEL_PARALLEL_RANK
    ps._PIPELINE_MODEL_PARALLEL_GROUP = _MirroredGroup(group, rank)
    ps.set_pipeline_model_parallel_rank(rank)
    try:
        yield
    finally:
        ps._PIPELINE_MODEL_PARALLEL_GROUP = group
        ps.set_pipeline_model_parallel_rank(forced)


def v_spec(spec):
    """``spec`` with megatron's TransformerConfig set to two virtual stages per rank."""
    num_layers, pp = spec.config.num_layers, spec.config.pipeline_model_parallel_size
    if num_layers % (2 * pp):
        raise ValueError(f"--schedules-method dualpipev splits {num_layers} layers into 2 x PP = {2 * pp} chunks; "
                         f"use a multiple of {2 * pp} layers")  # fmt: skip
    return dataclasses.replace(spec, config=dataclasses.replace(spec.config, virtual_pipeline_model_parallel_size=2))


def build_models(config: TrainConfig, spec) -> tuple[object, list]:
    """(the V's spec, this rank's two GPTModel chunks ``[block r, block 2PP-1-r]``), for
    ``loop.build_job`` to wrap (Float16Module, DDP) like any chunks."""
    from megatron.core import parallel_state as ps

    import mindspeed_models as mm

    check_config(config)
    spec = v_spec(spec)
    pp, rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    first = mm.build_model(spec, pre_process=rank == 0, post_process=False, vp_stage=0)
    with _pipeline_rank_view(pp - 1 - rank):
        second = mm.build_model(spec, pre_process=False, post_process=rank == 0, vp_stage=1)
    if getattr(second, "mtp_process", False) and not second.pre_process:
        if second.share_embeddings_and_output_weights:
            # tied + MTP: the output layer uses MTP's embedding copy; megatron allocates an unused
            # output weight off the first stage, then its sharded_state_dict asserts there is none
            second.output_layer.weight = None
    copies = _embedding_copies(first, second)
    if copies:
        # megatron zeroes the last stage's copy (tied output layer, or MTP's embedding) and all-reduces
        # it with the embedding over the embedding group; here both are on this rank: copy it over.
        with torch.no_grad():
            copies[1].copy_(copies[0])
    return spec, [first, second]


def _embedding_copies(first, last) -> list:
    """The word-embedding weight's two copies on pipeline rank 0 (``[chunk 0's embedding, the last
    chunk's copy]``) when the last chunk needs one, else ``[]``: megatron's
    ``shared_embedding_or_output_weight`` of the last chunk, i.e. MTP's own embedding (which the
    tied output layer then also uses) or the tied output layer's weight."""
    if not (first.pre_process and last.post_process):
        return []
    if not (last.share_embeddings_and_output_weights or getattr(last, "mtp_process", False)):
        return []
    return [first.embedding.word_embeddings.weight, last.shared_embedding_or_output_weight()]


def as_job(job: Job) -> DualPipeVJob:
    """``job`` as the V's job, with the linear layers that can defer their weight gradients."""
    fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(Job)}
    return DualPipeVJob(**fields, linears=tuple(_linears(job.chunks)))


def _gpt(chunk):
    """The GPTModel inside megatron's DDP (and Float16Module)."""
    from megatron.core.transformer.module import Float16Module

    model = chunk.module
    return model.module if isinstance(model, Float16Module) else model


# -- deferred weight gradients ------------------------------------------------------------------


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    # megatron's DDP keeps gradients in param.main_grad (what its backward hook would add into)
    target = getattr(param, "main_grad", None)
    if target is not None:
        target.add_(grad)
    elif param.grad is None:
        param.grad = grad.detach().clone()
    else:
        param.grad.add_(grad)


class _DeferrableMatmul(torch.autograd.Function):
    """``x @ W^T (+ b)`` as megatron's linear computes it; while ``store`` captures, the backward
    returns only the input gradient and queues dW/db (accumulated into ``main_grad`` later)."""

    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.save_for_backward(x, weight)
        ctx.store, ctx.params = store, (weight, bias)
        out = torch.matmul(x, weight.t())
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        bias = ctx.params[1]
        grad_x = grad_out.matmul(weight)

        def weight_grads():
            g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
            return g2.t().matmul(x2), (g2.sum(dim=0) if bias is not None else None)

        if not ctx.store.capturing:
            grad_w, grad_b = weight_grads()
            return grad_x, grad_w, grad_b, None

        def deferred() -> None:
            with torch.no_grad():  # runs outside autograd's backward (a W slot of the schedule)
                grad_w, grad_b = weight_grads()
                _accumulate(ctx.params[0], grad_w)
                if grad_b is not None:
                    _accumulate(bias, grad_b)

        ctx.store.put(deferred)
        return grad_x, None, None, None


class _DeferringImpl:
    """Replaces a megatron linear's ``_forward_impl``: deferrable when the layer's backward needs
    no tensor-parallel communication, megatron's own otherwise."""

    def __init__(self, original) -> None:
        self.original, self.store = original, None

    def __call__(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                 sequence_parallel=False, grad_output_buffer=None, **kwargs):  # fmt: skip
        # (fused accumulation is no obstacle: the deferred weight gradients go into main_grad anyway)
        plain = not (allreduce_dgrad or sequence_parallel or grad_output_buffer)
        if self.store is None or not plain or not weight.requires_grad or not torch.is_grad_enabled():
            return self.original(input=input, weight=weight, bias=bias, gradient_accumulation_fusion=gradient_accumulation_fusion,
                                 allreduce_dgrad=allreduce_dgrad, sequence_parallel=sequence_parallel,
                                 grad_output_buffer=grad_output_buffer, **kwargs)  # fmt: skip
        return _DeferrableMatmul.apply(input, weight, bias, self.store)


def _linears(chunks) -> list:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    found = []
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                module._forward_impl = _DeferringImpl(module._forward_impl)
                found.append(module)
    return found


def _bind_store(job: DualPipeVJob, store) -> None:
    for module in job.linears:
        module._forward_impl.store = store


# -- one global batch ----------------------------------------------------------------------------


class _Identity(nn.Module):
    """The last chunk as the executor sees it; ``loss_fn`` runs the chunk itself (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Stage(nn.Module):
    """A non-final V chunk: ``[2, micro, S]`` tokens+positions (chunk 0) or ``[S, micro, H]`` in,
    ``[S, micro, H]`` out."""

    def __init__(self, chunk, first: bool) -> None:
        super().__init__()
        self.chunk, self.first = chunk, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = _gpt(self.chunk)
        if self.first:
            return model(x[0], x[1], None)
        model.set_input_tensor(x)
        return model(None, None, None)


class _Losses:
    """``loss_fn`` of the executor: the last chunk's per-token loss reduced as ``loop._loss_func``
    does; keeps each micro-batch's loss record and (per-token loss) the token count."""

    def __init__(self, chunk, config, cp=None) -> None:
        self.chunk, self.per_token, self.scale = chunk, config.per_token_loss, None
        self.cp_group = cp.groups.cp if cp is not None else None
        self.records: dict[int, dict] = {}
        self.tokens = torch.zeros((), dtype=torch.float64)

    def __call__(self, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        model = _gpt(self.chunk)
        model.set_input_tensor(hidden)
        per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float()
        out = _loss_func(batch["loss_mask"], self.per_token, self.cp_group, per_token)
        if self.per_token:
            loss, count, record = out
            self.tokens += count.double()
        else:
            loss, record = out
            if self.cp_group is not None:  # as megatron's forward_step: DDP averages over the cp ranks too
                loss = loss * self.cp_group.size()
        self.records[batch["index"]] = record
        return self.scale(loss) if self.scale is not None else loss


def _microbatches(data_iterator, count: int, rank: int, cp=None) -> tuple[list, list]:
    """(chunk-0 inputs, loss labels) of ``count`` micro-batches (this CP rank's tokens under context
    parallelism). Every pipeline rank reads them (the iterators stay in step); only rank 0 of the
    pipeline uses them."""
    from mindspeed_train import context

    inputs, labels = [], []
    for index in range(count):
        batch = next(data_iterator)
        if "segments" in batch:
            raise ValueError("--schedules-method dualpipev with packed (THD) batches is not implemented; "
                             "drop --reset-attention-mask / --neat-pack")  # fmt: skip
        if cp is not None:
            batch = context.split_batch(batch, cp)
        if rank == 0:
            inputs.append(torch.stack([batch["tokens"], batch["position_ids"]]))
            # (tokens and positions: the last chunk's MTP layers embed the shifted tokens)
            labels.append({"labels": batch["labels"], "loss_mask": batch["loss_mask"], "index": index,
                           "tokens": batch["tokens"], "position_ids": batch["position_ids"]})  # fmt: skip
    return inputs, labels


def schedule(job: DualPipeVJob, data_iterator, forward_only: bool) -> list[dict]:
    """One global batch through the V (``loop._schedule``'s contract): the per-micro-batch loss
    records ``{"lm loss": tensor}`` on pipeline rank 0 (empty elsewhere); with ``forward_only`` no
    gradients, else the DP-reduced gradients in the chunks' ``main_grad`` buffers."""
    from megatron.core import parallel_state as ps

    from mindspeed_parallel.pipeline.dualpipev import DualPipeV

    count, rank = job.config.batch.num_microbatches, ps.get_pipeline_model_parallel_rank()
    inputs, labels = _microbatches(data_iterator, count, rank, job.cp)
    losses = _Losses(job.chunks[1], job.config, job.cp)
    if forward_only:
        _forward_only(job, inputs, labels, losses, count)
        return [losses.records[i] for i in sorted(losses.records)]
    _set_aux_loss_scales(job.spec.config, count)
    losses.scale = job.spec.config.grad_scale_func
    stages = [_Stage(job.chunks[0], first=rank == 0), _Identity() if rank == 0 else _Stage(job.chunks[1], first=False)]
    executor = DualPipeV(stages, ps.get_pipeline_model_parallel_group(), dw_detach=job.config.parallel.dw_detach)
    _bind_store(job, executor.runner.store)
    try:
        if rank == 0:
            executor.step(count, inputs, labels, losses)
        else:
            executor.step(count)
    finally:
        _bind_store(job, None)
    _finalize_grads(job, losses.tokens if job.config.per_token_loss else None, count)
    return [losses.records[i] for i in sorted(losses.records)]


def _set_aux_loss_scales(config, count: int) -> None:
    """MoE auxiliary losses and the MTP loss add their gradients through megatron's autoscalers,
    whose scales megatron's ``forward_step`` sets: the main loss scale / N (N = micro-batches), or
    with per-token loss the loss scale itself, finalize_model_grads later dividing every gradient
    by the step's token count. Here the per-token path rescales all gradients by N / tokens
    (``_finalize_grads``), so 1/N is right for both."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    scale = config.grad_scale_func(torch.ones(1)) if config.grad_scale_func is not None else torch.ones(1)
    if getattr(config, "num_moe_experts", None) is not None:
        MoEAuxLossAutoScaler.set_loss_scale(scale / count)
    if getattr(config, "mtp_num_layers", None) is not None:
        MTPLossAutoScaler.set_loss_scale(scale / count)


def _finalize_grads(job: DualPipeVJob, tokens: torch.Tensor | None, count: int) -> None:
    """Tied copies summed, then megatron's finalize_model_grads (DP reduction); per-token loss:
    gradients of the token sum over the global batch / its token count (megatron's scaling)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    _sum_tied_grads(job)
    finalize_model_grads(job.chunks, None)
    if tokens is None:
        return
    # the token count lives on pipeline rank 0 (megatron's finalize broadcasts from the last stage)
    total = tokens.clone()
    dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    if total.item() > 0:
        for chunk in job.chunks:  # the executor already divided each micro-batch loss by N
            chunk.scale_gradients(count / float(total.item()))


def _sum_tied_grads(job: DualPipeVJob) -> None:
    """The word embedding's two copies on pipeline rank 0 (chunk 0's embedding; the last chunk's
    tied output layer or MTP embedding, see ``_embedding_copies``) both get the sum of their
    gradients, as the one shared weight of PP=1 would (done on the local gradients, before the DP
    reduction, so a distributed optimizer's shards agree)."""
    copies = _embedding_copies(_gpt(job.chunks[0]), _gpt(job.chunks[1]))
    if not copies:
        return
    embedding, output = copies
    if embedding.requires_grad:
        total = embedding.main_grad + output.main_grad
        embedding.main_grad.copy_(total)
        output.main_grad.copy_(total)


def _forward_only(job: DualPipeVJob, inputs: list, labels: list, losses: _Losses, count: int) -> None:
    """Evaluation: each micro-batch down the V, chunk by chunk (no backward, so no schedule);
    activations cross ranks with the executor's tagged point-to-point messages."""
    from megatron.core import parallel_state as ps

    from mindspeed_parallel.pipeline import p2p

    group = ps.get_pipeline_model_parallel_group()
    pp, rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    owner = [s if s < pp else 2 * pp - 1 - s for s in range(2 * pp)]
    stages = {rank: _Stage(job.chunks[0], first=rank == 0), 2 * pp - 1 - rank: _Stage(job.chunks[1], first=False)}
    sends: list = []
    for mb in range(count):
        x = inputs[mb] if rank == 0 else None
        for s in range(2 * pp):
            if owner[s] != rank:
                continue
            if s > 0 and owner[s - 1] != rank:
                x = p2p.recv_tensor(owner[s - 1], mb * 2 * pp + s, group)
            if s == 2 * pp - 1:
                losses(x, labels[mb])
                continue
            x = stages[s](x)
            if owner[s + 1] != rank:
                sends += p2p.isend_tensor(x, owner[s + 1], mb * 2 * pp + s + 1, group)
    p2p.wait_all(sends)
