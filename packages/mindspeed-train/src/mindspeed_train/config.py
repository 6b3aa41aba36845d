"""The training job's settings: frozen dataclasses built from a validated mindspeed-args ``Config``.

The loop never reads argparse namespaces or the args ``Config`` directly; ``TrainConfig.from_args``
is the one place that maps canonical parameter names onto what the loop needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

LR_STYLES = ("cosine", "linear", "constant")

# The canonical parameters `mindspeed train` reads (TrainConfig.from_args and the model-size flags of
# mindspeed_train.launch); mindspeed_args.implemented marks them as implemented by mindspeed-train.
TRAIN_PARAMETERS = frozenset({
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "micro_batch_size", "global_batch_size", "seq_length", "train_iters",
    "data_path", "split", "seed", "make_vocab_size_divisible_by", "tokenizer_name_or_path",
    "lr", "min_lr", "lr_decay_style", "lr_decay_iters", "lr_warmup_iters", "lr_warmup_fraction", "lr_warmup_init",
    "weight_decay", "clip_grad", "adam_beta1", "adam_beta2", "adam_eps", "use_distributed_optimizer",
    "save", "save_interval", "load", "no_load_optim", "no_save_optim", "no_load_rng", "no_save_rng", "finetune",
    "log_interval", "num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
    "num_experts",
    "eval_interval", "eval_iters", "tensorboard_dir", "save_total_limit", "bf16",
})  # fmt: skip



@dataclass(frozen=True)
class ParallelSettings:
    """Process layout: group sizes. data = world / (tensor x pipeline); expert parallelism splits
    the MoE experts over ranks of the data-parallel group (CP = 1 here)."""

    tensor: int
    pipeline: int
    expert: int
    data: int
    world: int


@dataclass(frozen=True)
class BatchSettings:
    """Samples per step. ``num_microbatches`` = global / (micro x data-parallel)."""

    micro: int
    global_: int
    seq_length: int
    num_microbatches: int


@dataclass(frozen=True)
class OptimSettings:
    """Adam, weight decay (megatron excludes biases and 1-D parameters), clipping and the LR schedule.
    Warmup and decay lengths are in iterations."""

    lr: float
    min_lr: float
    lr_decay_style: str
    lr_decay_iters: int
    lr_warmup_iters: int
    lr_warmup_init: float
    weight_decay: float
    clip_grad: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    distributed_optimizer: bool


@dataclass(frozen=True)
class CheckpointSettings:
    """Where and what to save/load. ``save_interval`` None or 0 = only at the end (when ``save`` is set)."""

    save: str | None
    save_interval: int | None
    load: str | None
    load_optim: bool
    save_optim: bool
    load_rng: bool
    save_rng: bool
    finetune: bool
    save_total_limit: int | None = None  # keep only the newest N iter_* directories (None: all)


@dataclass(frozen=True)
class EvalSettings:
    """Validation every ``interval`` iterations over ``iters`` global batches of the validation
    split (``iters`` -1: as many as the validation split holds). ``interval`` None: no evaluation."""

    interval: int | None
    iters: int


@dataclass(frozen=True)
class TrainConfig:
    """Everything one ``mindspeed train`` run needs."""

    model: str
    data_path: tuple[str, ...]
    split: str
    seed: int
    train_iters: int
    log_interval: int
    make_vocab_size_divisible_by: int
    output_dir: str
    tokenizer: str | None
    parallel: ParallelSettings
    batch: BatchSettings
    optim: OptimSettings
    ckpt: CheckpointSettings
    eval: EvalSettings = EvalSettings(interval=None, iters=0)
    tensorboard_dir: str | None = None
    bf16: bool = False  # megatron's Float16Module (bf16 compute) + fp32 main params in the optimizer

    @classmethod
    def from_args(cls, cfg: Any, *, model: str, output_dir: str | None, world_size: int,
                  save_total_limit: int | None = None) -> TrainConfig:
        """Build from a validated mindspeed-args ``Config`` plus the launcher-only flags."""
        get = cfg.get
        _require(get, "train_iters", "--train-iters N")
        _require(get, "data_path", "--data-path PREFIX (an indexed dataset from `mindspeed preprocess`)")
        tp, pp, ep = get("tensor_model_parallel_size"), get("pipeline_model_parallel_size"), get("expert_model_parallel_size")
        if world_size % (tp * pp):
            raise ValueError(f"TP {tp} x PP {pp} does not divide the world size {world_size}; change the parallel sizes")
        dp = world_size // (tp * pp)
        micro, global_ = get("micro_batch_size"), get("global_batch_size") or get("micro_batch_size") * dp
        if global_ % (micro * dp):
            raise ValueError(f"--global-batch-size {global_} is not a multiple of micro batch {micro} x data-parallel {dp}")
        save = get("save")
        return cls(
            model=model, data_path=tuple(get("data_path")), split=get("split") or "100,0,0", seed=get("seed"),
            train_iters=get("train_iters"), log_interval=get("log_interval"),
            make_vocab_size_divisible_by=get("make_vocab_size_divisible_by"),
            output_dir=output_dir or save or os.path.join(os.getcwd(), "output"),
            tokenizer=get("tokenizer_name_or_path"),
            parallel=ParallelSettings(tensor=tp, pipeline=pp, expert=ep, data=dp, world=world_size),
            batch=BatchSettings(micro=micro, global_=global_, seq_length=_seq_length(get),
                                num_microbatches=global_ // (micro * dp)),
            optim=_optim(get),
            ckpt=CheckpointSettings(
                save=save, save_interval=get("save_interval"), load=get("load"),
                load_optim=not get("no_load_optim"), save_optim=not get("no_save_optim"),
                load_rng=not get("no_load_rng"), save_rng=not get("no_save_rng"), finetune=bool(get("finetune")),
                save_total_limit=save_total_limit,
            ),
            eval=_eval(get), tensorboard_dir=get("tensorboard_dir"), bf16=bool(get("bf16")),
        )  # fmt: skip


def _require(get, name: str, flag: str) -> None:
    if get(name) is None:
        raise ValueError(f"{name} is required for mindspeed train; pass {flag}")


def _eval(get) -> EvalSettings:
    # The schema's rule: an unset eval_interval follows save_interval. Evaluation still needs a
    # validation share in --split; without one the loop skips it.
    interval = get("eval_interval") or get("save_interval") or None
    iters = get("eval_iters")
    if iters is None or iters < -1:
        raise ValueError(f"--eval-iters {iters!r} is invalid; pass a positive count, 0 (off) or -1 (whole split)")
    return EvalSettings(interval=interval if iters != 0 else None, iters=iters)


def _seq_length(get) -> int:
    seq = get("seq_length")
    if seq is None:
        raise ValueError("seq_length is required for mindspeed train; pass --seq-length N")
    return seq


def _optim(get) -> OptimSettings:
    style = get("lr_decay_style")
    if style not in LR_STYLES:
        raise ValueError(f"--lr-decay-style {style!r} is not implemented; use one of {', '.join(LR_STYLES)}")
    lr = get("lr")
    if lr is None:
        raise ValueError("lr is required for mindspeed train; pass --lr VALUE")
    iters = get("train_iters")
    decay = get("lr_decay_iters") or iters
    fraction = get("lr_warmup_fraction")
    warmup = int(fraction * decay) if fraction is not None else get("lr_warmup_iters")
    return OptimSettings(
        lr=lr, min_lr=get("min_lr"), lr_decay_style=style, lr_decay_iters=decay, lr_warmup_iters=warmup,
        lr_warmup_init=get("lr_warmup_init"), weight_decay=get("weight_decay"), clip_grad=get("clip_grad"),
        adam_beta1=get("adam_beta1"), adam_beta2=get("adam_beta2"), adam_eps=get("adam_eps"),
        distributed_optimizer=bool(get("use_distributed_optimizer")),
    )  # fmt: skip
