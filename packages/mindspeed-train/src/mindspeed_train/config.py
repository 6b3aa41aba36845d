"""The training job's settings: frozen dataclasses built from a validated mindspeed-args ``Config``.

The loop never reads argparse namespaces or the args ``Config`` directly; ``TrainConfig.from_args``
is the one place that maps canonical parameter names onto what the loop needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mindspeed_parallel.cp.config import CPConfig
from mindspeed_parallel.tp2d import TP2DOverlap

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
    "eval_interval", "eval_iters", "tensorboard_dir", "save_total_limit", "bf16", "ckpt_format",
    "profile", "profile_step_start", "profile_step_end", "profile_ranks", "profile_save_path", "profile_level",
    "profile_with_cpu", "profile_with_memory", "profile_record_shapes", "profile_with_stack",
    "is_instruction_dataset", "neat_pack", "reset_attention_mask", "variable_seq_lengths", "pad_to_multiple_of", "no_shuffle",
    "calculate_per_token_loss", "sequence_parallel", "fp16", "loss_scale", "initial_loss_scale", "min_loss_scale",
    "loss_scale_window", "hysteresis", "recompute_granularity", "recompute_method", "recompute_num_layers",
    "recompute_norm", "recompute_activation_function", "use_mcore_models", "num_layers_per_virtual_pipeline_stage",
    "cross_entropy_loss_fusion", "no_gradient_accumulation_fusion",
    "context_parallel_size", "context_parallel_algo", "ulysses_degree_in_cp", "cp_attention_mask_type",
    "cp_window_size", "use_cp_send_recv_overlap", "kv_head_repeat_before_uly_alltoall", "attention_mask_on_cpu",
    "adaptive_cp_without_coarse", "adaptive_cp_dynamic_attn_mask", "adaptive_cp_only_reschedule",
    "adaptive_cp_manually_set_mask_list", "schedules_method", "dualpipev_dw_detach",
    "tp_2d", "tp_x", "tp_y", "enable_overlap_ag_with_matmul", "enable_overlap_matmul_with_rs",
    "enable_backward_overlap_ag_with_matmul", "use_nd_matmul", "nd1_dim1_size", "nd2_dim1_size",
    "manual_gc", "manual_gc_interval",
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
    sequence_parallel: bool = False  # megatron's SP: activations outside TP regions split over the sequence
    virtual: int | None = None  # model chunks per pipeline stage (interleaved 1F1B); None: one
    context: int = 1  # context-parallel ranks: each holds 1/context of every sequence
    cp: CPConfig | None = None  # the CP algorithm and its options when context > 1
    schedule: str | None = None  # --schedules-method: None (megatron's 1F1B / interleaved) or "dualpipev"
    dw_detach: bool = False  # --dualpipev-dw-detach: DualPipeV defers weight gradients in its cooldown
    tp_2d: bool = False  # --tp-2d: decoder layers split over a tp_x x tp_y grid of the TP group (mindspeed_models.tp2d)
    tp_x: int = 1
    tp_y: int = 1
    tp2d_overlap: TP2DOverlap | None = None  # the --enable-*overlap* options of the 2-D linear layers (with tp_2d)
    # --use-nd-matmul: (nd1_dim1_size, nd2_dim1_size) of the NDMM decoder layers (mindspeed_models.ndmm); None: off
    nd_matmul: tuple[int, int] | None = None


@dataclass(frozen=True)
class PrecisionSettings:
    """``bf16``/``fp16`` compute (megatron's Float16Module) with fp32 main parameters in the
    optimizer; fp16 scales the loss: a fixed ``loss_scale``, else megatron's dynamic scaler (start
    ``initial_loss_scale``, halve after ``hysteresis`` overflowing steps, which are skipped, double
    after ``loss_scale_window`` clean ones, never below ``min_loss_scale``)."""

    bf16: bool = False
    fp16: bool = False
    loss_scale: float | None = None
    initial_loss_scale: float = 2.0**32
    min_loss_scale: float = 1.0
    loss_scale_window: float = 1000.0
    hysteresis: int = 2


@dataclass(frozen=True)
class RecomputeSettings:
    """Activation recomputation, as megatron-core's TransformerConfig takes it: ``granularity``
    "full" (whole layers; ``method`` uniform/block over ``num_layers``) or "selective" (megatron's
    default module: core attention); ``norm`` recomputes the layer norms (selective "layernorm");
    ``activation_function`` drops each dense MLP's activation output after fc2 and recomputes it in
    backward (mindspeed-models' ActivationRecomputeMLP)."""

    granularity: str | None = None
    method: str | None = None
    num_layers: int | None = None
    norm: bool = False
    activation_function: bool = False

    def megatron_kwargs(self) -> dict:
        """The TransformerConfig fields (and mindspeed-models options) for these settings."""
        for flag, on in (("--recompute-norm", self.norm), ("--recompute-activation-function", self.activation_function)):
            if on and self.granularity is not None:
                raise ValueError(f"{flag} together with --recompute-granularity is not implemented (megatron-core "
                                 "cannot mix whole-layer and per-module recompute); drop one of them")  # fmt: skip
        extra = {"recompute_activation_function": True} if self.activation_function else {}
        if self.norm:
            return {"recompute_granularity": "selective", "recompute_modules": ["layernorm"], **extra}
        if self.granularity is None:
            return extra
        return {"recompute_granularity": self.granularity, "recompute_method": self.method,
                "recompute_num_layers": self.num_layers}  # fmt: skip


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
    format: str = "torch_dist"  # ckpt_format: "torch_dist" (megatron dist_checkpointing) or "torch" (legacy)


CKPT_FORMATS = ("torch_dist", "torch")


@dataclass(frozen=True)
class DataSettings:
    """What the samples are and how a microbatch is laid out.

    ``instruction``: `mindspeed preprocess` instruction output (``--is-instruction-dataset``), else
    pretraining documents. ``packed``: rows are fed as THD sequences with ``cu_seqlens`` so packed
    samples (neat-pack segments; pretraining documents split at EOD with ``--reset-attention-mask``)
    never attend to each other. ``variable``: instruction rows padded to the longest sample of the
    microbatch rounded up to ``pad_to_multiple_of`` instead of ``seq_length``."""

    instruction: bool = False
    packed: bool = False
    variable: bool = False
    pad_to_multiple_of: int = 8
    shuffle: bool = True


@dataclass(frozen=True)
class ProfileSettings:
    """torch.profiler over the iterations with 0-based index in ``[step_start, step_end)`` (megatron's
    convention: the 1-based iterations ``step_start + 1 .. step_end``; ``step_end`` -1: to the end)
    on ``ranks`` (-1 in it: every rank); traces go to ``save_path``. ``level`` (level_none/level0/1/2)
    chooses how much the profiler records (see :mod:`mindspeed_train.profiling`)."""

    enabled: bool = False
    step_start: int = 10
    step_end: int = 12
    ranks: tuple[int, ...] = (-1,)
    save_path: str = "./profile_dir"
    level: str = "level0"
    with_cpu: bool = False
    with_memory: bool = False
    record_shapes: bool = False
    with_stack: bool = False


@dataclass(frozen=True)
class EvalSettings:
    """Validation every ``interval`` iterations over ``iters`` global batches of the validation
    split (``iters`` -1: as many as the validation split holds). ``interval`` None: no evaluation."""

    interval: int | None
    iters: int


@dataclass(frozen=True)
class GcSettings:
    """megatron's manual garbage collection (:mod:`mindspeed_train.garbage`): ``manual`` turns Python's
    automatic collector off for the run; ``interval`` > 0 also collects every that many iterations."""

    manual: bool = False
    interval: int = 0

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ValueError(f"--manual-gc-interval {self.interval}: must be >= 0 (0: no collection between steps)")
        if self.interval and not self.manual:
            raise ValueError(f"--manual-gc-interval {self.interval} is used only with --manual-gc; add --manual-gc")


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
    precision: PrecisionSettings = PrecisionSettings()
    recompute: RecomputeSettings = RecomputeSettings()
    profile: ProfileSettings = ProfileSettings()
    data: DataSettings = DataSettings()
    per_token_loss: bool = False  # --calculate-per-token-loss: the global batch's token mean
    loss_fusion: bool = False  # --cross-entropy-loss-fusion: LM/MTP loss via mindspeed_kernels' fused linear CE
    grad_accum_fusion: bool = True  # megatron's gradient_accumulation_fusion (off: --no-gradient-accumulation-fusion)
    gc: GcSettings = GcSettings()  # --manual-gc / --manual-gc-interval

    @classmethod
    def from_args(cls, cfg: Any, *, model: str, output_dir: str | None, world_size: int,
                  save_total_limit: int | None = None) -> TrainConfig:
        """Build from a validated mindspeed-args ``Config`` plus the launcher-only flags."""
        get = cfg.get
        _require(get, "train_iters", "--train-iters N")
        _require(get, "data_path", "--data-path PREFIX (an indexed dataset from `mindspeed preprocess`)")
        tp, pp, ep = get("tensor_model_parallel_size"), get("pipeline_model_parallel_size"), get("expert_model_parallel_size")
        cp = get("context_parallel_size") or 1
        if world_size % (tp * pp * cp):
            raise ValueError(f"TP {tp} x PP {pp} x CP {cp} does not divide the world size {world_size}; "
                             "change the parallel sizes")  # fmt: skip
        dp = world_size // (tp * pp * cp)
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
            parallel=ParallelSettings(tensor=tp, pipeline=pp, expert=ep, data=dp, world=world_size,
                                      sequence_parallel=bool(get("sequence_parallel")), virtual=_virtual(get),
                                      context=cp, cp=_cp(get, cp), schedule=get("schedules_method"),
                                      dw_detach=bool(get("dualpipev_dw_detach")), **_tp2d(get), **_ndmm(get)),
            batch=BatchSettings(micro=micro, global_=global_, seq_length=_seq_length(get),
                                num_microbatches=global_ // (micro * dp)),
            optim=_optim(get),
            ckpt=CheckpointSettings(
                save=save, save_interval=get("save_interval"), load=get("load"),
                load_optim=not get("no_load_optim"), save_optim=not get("no_save_optim"),
                load_rng=not get("no_load_rng"), save_rng=not get("no_save_rng"), finetune=bool(get("finetune")),
                save_total_limit=save_total_limit, format=_ckpt_format(get),
            ),
            eval=_eval(get), tensorboard_dir=get("tensorboard_dir"), precision=_precision(get),
            recompute=RecomputeSettings(granularity=get("recompute_granularity"), method=get("recompute_method"),
                                        num_layers=get("recompute_num_layers"), norm=bool(get("recompute_norm")),
                                        activation_function=bool(get("recompute_activation_function"))),
            profile=_profile(get),
            data=_data(get), per_token_loss=bool(get("calculate_per_token_loss")),
            loss_fusion=bool(get("cross_entropy_loss_fusion")),
            grad_accum_fusion=not get("no_gradient_accumulation_fusion"),
            gc=GcSettings(manual=bool(get("manual_gc")), interval=get("manual_gc_interval") or 0),
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


def _cp(get, size: int) -> CPConfig | None:
    """The CP algorithm's settings (mindspeed-args has checked the cross-parameter rules)."""
    if size == 1:
        return None
    return CPConfig(
        algo=get("context_parallel_algo"), size=size, ulysses_degree=get("ulysses_degree_in_cp"),
        mask_type=get("cp_attention_mask_type"), window_size=get("cp_window_size") or 1,
        send_recv_overlap=bool(get("use_cp_send_recv_overlap")),
        kv_head_repeat=bool(get("kv_head_repeat_before_uly_alltoall")), mask_on_cpu=bool(get("attention_mask_on_cpu")),
        adaptive_without_coarse=bool(get("adaptive_cp_without_coarse")),
        adaptive_dynamic_attn_mask=bool(get("adaptive_cp_dynamic_attn_mask")),
        adaptive_only_reschedule=bool(get("adaptive_cp_only_reschedule")),
        adaptive_manually_set_mask_list=bool(get("adaptive_cp_manually_set_mask_list")),
    )  # fmt: skip


# What the TP-2D and NDMM decoder layers do not cover yet (mindspeed_models.tp2d / .ndmm refuse model
# features themselves).
_GRID_REFUSED = (
    ("--ckpt-format torch", lambda get: get("ckpt_format") == "torch"),
    ("--sequence-parallel", lambda get: get("sequence_parallel")),
    ("--schedules-method dualpipev", lambda get: get("schedules_method") == "dualpipev"),
    ("packed sequences (--reset-attention-mask / --neat-pack)",
     lambda get: get("reset_attention_mask") or (get("is_instruction_dataset") and get("neat_pack"))),
    ("recomputation (--recompute-*)", lambda get: get("recompute_granularity") or get("recompute_norm")
     or get("recompute_activation_function")),
)  # fmt: skip


def _tp2d(get) -> dict:
    """ParallelSettings' TP-2D fields (mindspeed-args has checked tp_x * tp_y = TP and no SP)."""
    if not get("tp_2d"):
        return {}
    _refuse_grid(get, "--tp-2d")
    if (get("context_parallel_size") or 1) > 1:
        raise ValueError("--tp-2d with --context-parallel-size > 1 is not implemented yet; drop one of them")
    ag, rs = bool(get("enable_overlap_ag_with_matmul")), bool(get("enable_overlap_matmul_with_rs"))
    if ag and rs:
        raise ValueError("--enable-overlap-ag-with-matmul and --enable-overlap-matmul-with-rs are alternatives "
                         "(one forward overlap at a time); pass one of them")  # fmt: skip
    overlap = TP2DOverlap(ag_with_matmul=ag, matmul_with_rs=rs,
                          backward_ag_with_matmul=bool(get("enable_backward_overlap_ag_with_matmul")))  # fmt: skip
    return {"tp_2d": True, "tp_x": get("tp_x"), "tp_y": get("tp_y"), "tp2d_overlap": overlap}


def _refuse_grid(get, flag: str) -> None:
    for what, present in _GRID_REFUSED:
        if present(get):
            raise ValueError(f"{flag} with {what} is not implemented yet; drop one of them")


def _ndmm(get) -> dict:
    """ParallelSettings' NDMM field (mindspeed-args has checked that nd1/nd2 divide TP)."""
    if not get("use_nd_matmul"):
        return {}
    _refuse_grid(get, "--use-nd-matmul")
    if (get("tensor_model_parallel_size") or 1) < 2:
        raise ValueError("--use-nd-matmul splits the layers over the tensor-parallel group; "
                         "set --tensor-model-parallel-size 2 or more")  # fmt: skip
    return {"nd_matmul": (get("nd1_dim1_size") or 1, get("nd2_dim1_size") or 1)}


def _virtual(get) -> int | None:
    """Virtual pipeline stages from ``--num-layers-per-virtual-pipeline-stage`` (megatron's rule:
    the layers of each pipeline stage split evenly into chunks of that many)."""
    per_chunk = get("num_layers_per_virtual_pipeline_stage")
    if per_chunk is None:
        return None
    layers, pp = get("num_layers"), get("pipeline_model_parallel_size")
    if layers % pp or (layers // pp) % per_chunk:
        raise ValueError(f"--num-layers-per-virtual-pipeline-stage {per_chunk}: {layers} layers over {pp} pipeline "
                         f"stages do not split into chunks of {per_chunk}; pick a divisor of the layers per stage")
    chunks = layers // pp // per_chunk
    if get("ckpt_format") == "torch" and chunks > 1:
        raise ValueError("--ckpt-format torch with virtual pipeline stages is not implemented; use --ckpt-format torch_dist")
    return chunks if chunks > 1 else None


def _precision(get) -> PrecisionSettings:
    return PrecisionSettings(bf16=bool(get("bf16")), fp16=bool(get("fp16")), loss_scale=get("loss_scale"),
                             initial_loss_scale=get("initial_loss_scale"), min_loss_scale=get("min_loss_scale"),
                             loss_scale_window=get("loss_scale_window"), hysteresis=get("hysteresis"))  # fmt: skip


def _data(get) -> DataSettings:
    instruction = bool(get("is_instruction_dataset"))
    packed = bool(get("reset_attention_mask")) or (instruction and bool(get("neat_pack")))
    if get("no_shuffle") and not instruction:
        raise ValueError("--no-shuffle is implemented for instruction data only (megatron's GPTDataset always "
                         "shuffles); drop it or pass --is-instruction-dataset")  # fmt: skip
    if get("variable_seq_lengths") and (packed or not instruction):
        raise ValueError("--variable-seq-lengths pads instruction samples per microbatch; it needs "
                         "--is-instruction-dataset and no packing (--neat-pack/--reset-attention-mask)")  # fmt: skip
    multiple = get("pad_to_multiple_of")
    if multiple is None or multiple < 1:
        raise ValueError(f"--pad-to-multiple-of {multiple!r} must be >= 1")
    return DataSettings(instruction=instruction, packed=packed, variable=bool(get("variable_seq_lengths")),
                        pad_to_multiple_of=multiple, shuffle=not get("no_shuffle"))  # fmt: skip


def _ckpt_format(get) -> str:
    fmt = get("ckpt_format") or "torch_dist"
    if fmt not in CKPT_FORMATS:
        raise ValueError(f"--ckpt-format {fmt} is not implemented by mindspeed train; use torch_dist or torch")
    return fmt


def _profile(get) -> ProfileSettings:
    ranks = get("profile_ranks")
    return ProfileSettings(
        enabled=bool(get("profile")), step_start=get("profile_step_start"), step_end=get("profile_step_end"),
        ranks=tuple(ranks) if ranks is not None else (-1,), save_path=get("profile_save_path") or "./profile_dir",
        level=get("profile_level") or "level0", with_cpu=bool(get("profile_with_cpu")),
        with_memory=bool(get("profile_with_memory")), record_shapes=bool(get("profile_record_shapes")),
        with_stack=bool(get("profile_with_stack")),
    )  # fmt: skip


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
    if warmup >= decay:
        raise ValueError(f"the LR warmup ({warmup} iterations) must be shorter than the decay ({decay} iterations: "
                         "--lr-decay-iters, default --train-iters); lower --lr-warmup-iters/--lr-warmup-fraction")
    return OptimSettings(
        lr=lr, min_lr=get("min_lr"), lr_decay_style=style, lr_decay_iters=decay, lr_warmup_iters=warmup,
        lr_warmup_init=get("lr_warmup_init"), weight_decay=get("weight_decay"), clip_grad=get("clip_grad"),
        adam_beta1=get("adam_beta1"), adam_beta2=get("adam_beta2"), adam_eps=get("adam_eps"),
        distributed_optimizer=bool(get("use_distributed_optimizer")),
    )  # fmt: skip
