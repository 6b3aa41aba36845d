"""Recompute and swap rules: seed 000 section 26, plus the recompute conditions of seeds 002/003."""

from __future__ import annotations

from mindspeed_args.rules.base import Rule

S = "seed 000 §26"


def _incompatible(rid: str, flag: str, reads_extra: str, bad, constraint: str, fix: str) -> Rule:
    return Rule(
        id=rid, source=S, reads=(flag, reads_extra),
        applies=lambda v: bool(getattr(v, flag)), holds=lambda v: not bad(getattr(v, reads_extra)),
        constraint=constraint, fix=fix,
    )


RULES: tuple[Rule, ...] = (
    Rule(
        id="recompute.layers-per-pp-rank", source=f"{S}.1",
        reads=("enable_recompute_layers_per_pp_rank", "num_layers_per_virtual_pipeline_stage",
               "recompute_granularity", "recompute_method", "swap_attention", "recompute_activation_function"),
        applies=lambda v: bool(v.enable_recompute_layers_per_pp_rank),
        holds=lambda v: v.num_layers_per_virtual_pipeline_stage is not None and (
            (v.recompute_granularity is not None and v.recompute_method == "block")
            or bool(v.swap_attention) or bool(v.recompute_activation_function)),
        constraint="enable_recompute_layers_per_pp_rank needs virtual pipeline stages and a recompute "
        "(block recompute, swap_attention or recompute_activation_function)",
        fix="set num_layers_per_virtual_pipeline_stage and e.g. --recompute-granularity full --recompute-method block",
    ),
    _incompatible("recompute.activation.not-uniform", "recompute_activation_function", "recompute_method",
                  lambda m: m == "uniform", "uniform recomputation cannot be combined with activation-function recompute",
                  "use --recompute-method block or drop --recompute-activation-function"),
    _incompatible("recompute.activation.not-selective", "recompute_activation_function", "recompute_granularity",
                  lambda g: g == "selective", "selective recomputation cannot be combined with activation-function recompute",
                  "use --recompute-granularity full or drop --recompute-activation-function"),
    _incompatible("recompute.norm.not-uniform", "recompute_norm", "recompute_method",
                  lambda m: m == "uniform", "uniform recomputation cannot be combined with norm recompute",
                  "use --recompute-method block or drop --recompute-norm"),
    _incompatible("recompute.norm.not-selective", "recompute_norm", "recompute_granularity",
                  lambda g: g == "selective", "selective recomputation cannot be combined with norm recompute",
                  "use --recompute-granularity full or drop --recompute-norm"),
    _incompatible("recompute.norm.mcore", "recompute_norm", "use_mcore_models",
                  lambda m: not m, "recompute_norm is only supported with megatron-core models",
                  "add --use-mcore-models"),
    Rule(
        id="recompute.method-needs-full", source="seed 003 (recompute_method); Megatron",
        reads=("recompute_method", "recompute_granularity"),
        applies=lambda v: v.recompute_method is not None, holds=lambda v: v.recompute_granularity == "full",
        constraint="recompute_method takes effect only with recompute_granularity full",
        fix="add --recompute-granularity full, or drop recompute_method",
    ),
    Rule(
        id="recompute.num-layers-needs-full", source="seed 003 (recompute_num_layers); Megatron",
        reads=("recompute_num_layers", "recompute_granularity"),
        applies=lambda v: v.recompute_num_layers is not None, holds=lambda v: v.recompute_granularity == "full",
        constraint="recompute_num_layers takes effect only with recompute_granularity full",
        fix="add --recompute-granularity full, or drop recompute_num_layers",
    ),
    Rule(
        id="recompute.full-needs-method", source="Megatron-LM (validate_args)",
        reads=("recompute_granularity", "recompute_method"),
        applies=lambda v: v.recompute_granularity == "full", holds=lambda v: v.recompute_method is not None,
        constraint="recompute_granularity full needs recompute_method (uniform or block)",
        fix="add --recompute-method uniform (or block) and --recompute-num-layers",
    ),
    Rule(
        id="recompute.activation-num-layers-block", source="seed 000 §3",
        reads=("recompute_activation_function_num_layers", "recompute_method", "recompute_activation_function"),
        applies=lambda v: v.recompute_activation_function_num_layers is not None,
        holds=lambda v: bool(v.recompute_activation_function) and v.recompute_method in (None, "block"),
        constraint="recompute_activation_function_num_layers works with recompute_activation_function "
        "(and, with full recompute, only method block)",
        fix="add --recompute-activation-function; use --recompute-method block if you also recompute layers",
    ),
    Rule(
        id="swap.modules-need-swap-attention", source="seed 000 §1",
        reads=("swap_modules", "swap_attention"),
        applies=lambda v: v.swap_modules is not None, holds=lambda v: bool(v.swap_attention),
        constraint="swap_modules is used only together with swap_attention",
        fix="add --swap-attention, or drop --swap-modules",
    ),
)
