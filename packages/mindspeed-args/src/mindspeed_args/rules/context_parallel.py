"""Context-parallel rules: seed 000 section 25 (all nine groups)."""

from __future__ import annotations

from mindspeed_args.rules.base import Rule, multiple_of, round_up

S = "seed 000 §25"
CP = "context_parallel_size"
ALGO = "context_parallel_algo"
HEAD_READS = (CP, ALGO, "num_attention_heads", "tensor_model_parallel_size", "ulysses_degree")


def _cp_with(*algos: str):
    return lambda v: (getattr(v, CP) or 1) > 1 and getattr(v, ALGO) in algos


def _seq_rule(rid: str, algos: tuple[str, ...], factor: int, why: str) -> Rule:
    return Rule(
        id=rid, source=f"{S}.{why}", reads=(CP, ALGO, "seq_length"),
        applies=lambda v: _cp_with(*algos)(v) and v.seq_length is not None,
        holds=lambda v: multiple_of(v.seq_length, factor * getattr(v, CP)),
        constraint="seq_length must be a multiple of " + ("2 x " if factor == 2 else "")
        + "context_parallel_size = {m} for {context_parallel_algo}",
        fix="set seq_length to a multiple of {m} (e.g. {up})",
        extra=lambda v: {"m": factor * getattr(v, CP), "up": round_up(v.seq_length, factor * getattr(v, CP))},
        blame=("seq_length", CP, ALGO),
    )


def _general_mask_rule(rid: str, algos: tuple[str, ...], why: str) -> Rule:
    return Rule(
        id=rid, source=f"{S}.{why}", reads=(CP, ALGO, "cp_attention_mask_type", "micro_batch_size"),
        applies=lambda v: _cp_with(*algos)(v) and v.cp_attention_mask_type == "general",
        holds=lambda v: (v.micro_batch_size or 1) == 1,
        constraint="with cp_attention_mask_type=general, {context_parallel_algo} needs micro_batch_size 1",
        fix="set micro_batch_size 1 (raise gradient accumulation instead) or use cp_attention_mask_type causal",
    )


def _window_rule(rid: str, algos: tuple[str, ...], ring: str, why: str) -> Rule:
    ring_of = (lambda v: getattr(v, CP)) if ring == CP else (lambda v: v.ring_degree)
    return Rule(
        id=rid, source=f"{S}.{why}", reads=(CP, ALGO, "cp_window_size", "ring_degree"),
        applies=_cp_with(*algos),
        holds=lambda v: ring_of(v) is None or (
            v.cp_window_size is not None and 1 <= v.cp_window_size and multiple_of(ring_of(v), v.cp_window_size)
            and (v.cp_window_size < ring_of(v) or v.cp_window_size == 1)),
        constraint="cp_window_size must be in [1, {ring}) and divide {ring} = {r}",
        fix="set cp_window_size to a divisor of {r} smaller than it (1 disables the double ring)",
        extra=lambda v: {"ring": "ring degree" if ring != CP else "context_parallel_size", "r": ring_of(v)},
        blame=("cp_window_size", CP, ALGO),
    )


def _heads_rule(rid: str, algos: tuple[str, ...], why: str) -> Rule:
    return Rule(
        id=rid, source=f"{S}.{why}", reads=HEAD_READS,
        applies=lambda v: _cp_with(*algos)(v) and v.num_attention_heads is not None and v.ulysses_degree,
        holds=lambda v: multiple_of(v.num_attention_heads, v.ulysses_degree * (v.tensor_model_parallel_size or 1)),
        constraint="num_attention_heads must be a multiple of ulysses degree x tensor_model_parallel_size = {m}",
        fix="choose a context/ulysses degree and TP size whose product divides {num_attention_heads}",
        extra=lambda v: {"m": v.ulysses_degree * (v.tensor_model_parallel_size or 1)},
    )


def _degree_rules(prefix: str, algo: str, why: str) -> tuple[Rule, ...]:
    return (
        Rule(
            id=f"{prefix}.degree-required", source=f"{S}.{why}", reads=(CP, ALGO, "ulysses_degree_in_cp"),
            applies=_cp_with(algo), holds=lambda v: v.ulysses_degree_in_cp is not None,
            constraint="{context_parallel_algo} needs ulysses_degree_in_cp",
            fix="set ulysses_degree_in_cp to a divisor of context_parallel_size={context_parallel_size}",
        ),
        Rule(
            id=f"{prefix}.degree-divides", source=f"{S}.{why}", reads=(CP, ALGO, "ulysses_degree_in_cp"),
            applies=lambda v: _cp_with(algo)(v) and v.ulysses_degree_in_cp is not None,
            holds=lambda v: v.ulysses_degree_in_cp > 0 and multiple_of(getattr(v, CP), v.ulysses_degree_in_cp),
            constraint="context_parallel_size must be a multiple of ulysses_degree_in_cp",
            fix="set ulysses_degree_in_cp to a divisor of {context_parallel_size}",
        ),
    )


ULY, RING, HYB, ADA, HADA = "ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo", "adaptive_cp_algo", "hybrid_adaptive_cp_algo"

RULES: tuple[Rule, ...] = (
    Rule(
        id="cp.mcore", source=f"{S}.3", reads=(CP, "use_mcore_models"),
        applies=lambda v: (getattr(v, CP) or 1) > 1, holds=lambda v: bool(v.use_mcore_models),
        constraint="context parallelism runs only on megatron-core models",
        fix="add --use-mcore-models (use_mcore_models true)",
    ),
    _seq_rule("cp.ulysses.seq-length", (ULY,), 1, "4"),
    _heads_rule("cp.ulysses.heads", (ULY,), "4"),
    Rule(
        id="cp.ulysses.query-groups-tp", source=f"{S}.4",
        reads=(CP, ALGO, "group_query_attention", "num_query_groups", "tensor_model_parallel_size"),
        applies=lambda v: _cp_with(ULY)(v) and bool(v.group_query_attention) and v.num_query_groups is not None,
        holds=lambda v: multiple_of(v.num_query_groups, v.tensor_model_parallel_size or 1),
        constraint="with GQA, num_query_groups must be a multiple of tensor_model_parallel_size",
        fix="use a tensor_model_parallel_size that divides num_query_groups={num_query_groups}",
    ),
    Rule(
        id="cp.ulysses.query-groups", source=f"{S}.4",
        reads=(CP, ALGO, "group_query_attention", "num_query_groups", "tensor_model_parallel_size",
               "kv_head_repeat_before_uly_alltoall", "ulysses_degree"),
        applies=lambda v: _cp_with(ULY)(v) and bool(v.group_query_attention) and v.num_query_groups is not None
        and not v.kv_head_repeat_before_uly_alltoall,
        holds=lambda v: multiple_of(v.num_query_groups, v.ulysses_degree * (v.tensor_model_parallel_size or 1)),
        constraint="without kv_head_repeat_before_uly_alltoall, num_query_groups must be a multiple of "
        "ulysses degree x tensor_model_parallel_size = {m}",
        fix="enable kv_head_repeat_before_uly_alltoall, or pick sizes whose product divides {num_query_groups}",
        extra=lambda v: {"m": v.ulysses_degree * (v.tensor_model_parallel_size or 1)},
    ),
    _seq_rule("cp.ring.seq-length", (RING,), 2, "5"),
    _window_rule("cp.ring.window", (RING,), CP, "5"),
    _general_mask_rule("cp.ring.general-mask", (RING,), "5"),
    *_degree_rules("cp.hybrid", HYB, "6"),
    _seq_rule("cp.hybrid.seq-length", (HYB,), 2, "6"),
    _window_rule("cp.hybrid.window", (HYB,), "ring", "6"),
    _heads_rule("cp.hybrid.heads", (HYB,), "6"),
    _general_mask_rule("cp.hybrid.general-mask", (HYB,), "6"),
    _seq_rule("cp.adaptive.seq-length", (ADA,), 1, "7"),
    _general_mask_rule("cp.adaptive.general-mask", (ADA,), "7"),
    *_degree_rules("cp.hybrid-adaptive", HADA, "8"),
    _heads_rule("cp.hybrid-adaptive.heads", (HADA,), "8"),
    _seq_rule("cp.hybrid-adaptive.seq-length", (HADA,), 1, "8"),
    _general_mask_rule("cp.hybrid-adaptive.general-mask", (HADA,), "8"),
    Rule(
        id="cp.sliding-window", source=f"{S}.9", reads=(CP, "sliding_window"),
        applies=lambda v: v.sliding_window is not None, holds=lambda v: (getattr(v, CP) or 1) <= 1,
        constraint="sliding-window attention cannot be combined with context parallelism",
        fix="drop sliding_window or set context_parallel_size 1",
    ),
)
