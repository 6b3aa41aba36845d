"""Validation reports: rules, value checks, unimplemented parameters, derived notices, Config."""

from __future__ import annotations

import dataclasses

import pytest

from mindspeed_args import ConfigError, parse_args, validate

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "8", "--max-position-embeddings", "128"]


def test_choices_and_ranges_come_from_the_schema():
    r = validate(BASE + ["--context-parallel-algo", "ring", "--dpo-label-smoothing", "0.7"], environ={})
    rules = {v.rule: v for v in r.violations}
    assert "value.choices" in rules and "megatron_cp_algo" in rules["value.choices"].fix
    assert any(v.rule == "value.range" and "dpo_label_smoothing" in v.params for v in r.violations)


def test_unimplemented_parameters_are_violations_naming_the_parameter():
    r = validate(BASE + ["--use-fused-rmsnorm", "--normalization", "RMSNorm"], environ={})
    missing = [v for v in r.violations if v.rule == "not-implemented"]
    assert {n for v in missing for n in v.params} >= {"use_fused_rmsnorm", "normalization"}
    assert all("not implemented yet" in v.constraint for v in missing)


def test_setting_a_parameter_to_its_default_is_not_a_violation():
    r = validate(BASE + ["--context-parallel-size", "1"], environ={})
    assert not [v for v in r.violations if "context_parallel_size" in v.params]


def test_derived_values_are_notices():
    r = validate(BASE + ["--micro-batch-size", "2", "--global-batch-size", "16", "--tensor-model-parallel-size", "2"],
                 environ={}, world_size=8)
    notes = {n.name: n.value for n in r.notices}
    assert notes["data_parallel_size"] == 4 and notes["num_micro_batches"] == 2
    assert r.config.derived.data_parallel_size == 4


def test_global_batch_must_divide_by_micro_batch_times_dp():
    r = validate(BASE + ["--micro-batch-size", "2", "--global-batch-size", "12"], environ={"WORLD_SIZE": "4"})
    v = next(v for v in r.violations if v.rule == "batch.global-divisible")
    assert "multiple of micro_batch_size x data-parallel size = 8" in v.constraint


def test_fsdp2_compounds_become_megatron_semantics(tmp_path):
    f = tmp_path / "f.yaml"
    f.write_text("ModelArguments: {model_name_or_path: m}\nParallelArguments: {recompute: true}\n"
                 "TrainingArguments: {output_dir: o, per_device_train_batch_size: 2, gradient_accumulation_steps: 3}\n"
                 "DataArguments: {neat_packing: true}\n")
    r = validate(dialect="fsdp2", config=str(f), environ={}, world_size=4)
    v = r.resolved.values
    assert (v["recompute_granularity"], v["recompute_method"], v["recompute_num_layers"]) == ("full", "uniform", 1)
    assert v["global_batch_size"] == 4 * 2 * 3 and v["pack"] is True


def test_config_is_frozen_and_grouped():
    with pytest.raises(ConfigError) as exc:
        parse_args(["--context-parallel-size", "2"], environ={})
    assert exc.value.exit_code == 1 and exc.value.report.violations
    cfg = validate(BASE, environ={}).config
    assert cfg.model.num_layers == 2 and cfg.get("hidden_size") == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.num_layers = 3
    assert isinstance(cfg.fsdp.fsdp_modules, tuple)
