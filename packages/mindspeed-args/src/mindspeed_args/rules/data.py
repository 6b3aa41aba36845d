"""Data, FSDP2 and profiling rules (seed 001's "mutually exclusive"/"must" statements)."""

from __future__ import annotations

from mindspeed_args.rules.base import Rule

S = "seed 001"


def _exclusive(rid: str, a: str, b: str, set_a, set_b, constraint: str, fix: str, source: str = S) -> Rule:
    return Rule(id=rid, source=source, reads=(a, b), applies=lambda v: set_a(getattr(v, a)),
                holds=lambda v: not set_b(getattr(v, b)), constraint=constraint, fix=fix)


def _is_set(x) -> bool:
    return x not in (None, False, 0, 0.0, "", [])


RULES: tuple[Rule, ...] = (
    _exclusive("data.eval-dataset-vs-val-size", "eval_dataset", "val_size", _is_set, _is_set,
               "eval_dataset and val_size are mutually exclusive", "use either a separate eval_dataset or val_size"),
    _exclusive("data.train-on-prompt-vs-mask-history", "train_on_prompt", "mask_history", bool, bool,
               "train_on_prompt and mask_history cannot both be true", "set one of them to false"),
    _exclusive("data.streaming-vs-max-samples", "streaming", "max_samples", bool, _is_set,
               "streaming and max_samples are mutually exclusive", "drop max_samples when streaming"),
    Rule(
        id="data.streaming-val-size-integer", source=S, reads=("streaming", "val_size"),
        applies=lambda v: bool(v.streaming) and _is_set(v.val_size),
        holds=lambda v: float(v.val_size).is_integer(),
        constraint="with streaming, val_size must be a whole number of samples", fix="set val_size to an integer",
    ),
    Rule(
        id="data.val-size-needs-dataset", source=S, reads=("val_size", "dataset", "data_path"),
        applies=lambda v: _is_set(v.val_size), holds=lambda v: _is_set(v.dataset) or _is_set(v.data_path),
        constraint="val_size splits the training dataset, so a dataset is needed",
        fix="set dataset (--data-path)",
    ),
    Rule(
        id="data.val-size-range", source=S, reads=("val_size",),
        applies=lambda v: _is_set(v.val_size),
        holds=lambda v: v.val_size >= 0 and (v.val_size < 1 or float(v.val_size).is_integer()),
        constraint="val_size is a fraction in [0, 1) or a whole number of samples",
        fix="use e.g. 0.05 or 500",
    ),
    Rule(
        id="data.interleave-probs-need-interleave", source=S, reads=("interleave_probs", "mix_strategy"),
        applies=lambda v: v.interleave_probs is not None,
        holds=lambda v: v.mix_strategy in ("interleave_under", "interleave_over"),
        constraint="interleave_probs is used only with mix_strategy interleave_under/interleave_over",
        fix="set mix_strategy interleave_under (or interleave_over), or drop interleave_probs",
    ),
    Rule(
        id="data.desc-init-needs-config", source=S, reads=("init_special_tokens", "new_special_tokens_config"),
        applies=lambda v: v.init_special_tokens in ("desc_init", "desc_init_w_noise"),
        holds=lambda v: v.new_special_tokens_config is not None,
        constraint="init_special_tokens {init_special_tokens} needs new_special_tokens_config",
        fix="set new_special_tokens_config to the YAML of token descriptions, or use noise_init",
    ),
    Rule(
        id="fsdp.modules-non-empty", source=S, reads=("fsdp_modules",),
        applies=lambda v: True, holds=lambda v: bool(v.fsdp_modules),
        constraint="fsdp_modules must list at least one module pattern",
        fix="keep the default ['model.layers.{{}}', 'model.embed_tokens', 'lm_head'] or list your modules",
    ),
    Rule(
        id="profile.step-window", source=S, reads=("profile", "profile_step_start", "profile_step_end"),
        applies=lambda v: bool(v.profile) and v.profile_step_end not in (None, -1),
        holds=lambda v: v.profile_step_end > (v.profile_step_start or 0),
        constraint="profile_step_end must be -1 (until the end) or greater than profile_step_start",
        fix="set profile_step_end > {profile_step_start}",
    ),
)
