"""Reading each dialect: spellings, switches, lists, JSON, value maps and error reporting."""

from __future__ import annotations

import pytest

from mindspeed_args.dialects import fsdp2, megatron, swift
from mindspeed_args.documents import load_document
from mindspeed_args.errors import UsageError
from mindspeed_args.validate import validate


def test_megatron_switches_lists_and_values(schema):
    got = megatron.parse(schema, ["--use-mcore-models", "--seq-length=4096", "--lora-target-modules",
                                  "linear_qkv", "linear_proj", "--no-input-jitter", "--lr", "1e-4"])
    assert not got.problems
    assert got.values == {"use_mcore_models": True, "seq_length": 4096, "input_jitter": False,
                          "lora_target_modules": ["linear_qkv", "linear_proj"], "lr": 1e-4}


def test_megatron_reports_every_problem_at_once(schema):
    got = megatron.parse(schema, ["--seq_length", "8", "--num-layers", "x", "--use-flash-attn", "yes", "stray"])
    text = "\n".join(got.problems)
    assert len(got.problems) == 3
    assert "'--seq_length'" in text and "'--seq-length'" in text  # the swift spelling is named
    assert "--num-layers: 'x' is not an integer" in text
    assert "switch and takes no value" in text


def test_unknown_flag_gets_did_you_mean(schema):
    got = megatron.parse(schema, ["--tensor-model-paralel-size", "2"])
    assert "did you mean '--tensor-model-parallel-size'" in got.problems[0]


def test_swift_booleans_lists_and_extra_kwargs(schema):
    got = swift.parse(schema, ["--use_distributed_optimizer", "false", "--sequence_parallel",
                               "--recompute_modules", "core_attn", "moe",
                               "--megatron_extra_kwargs", '{"use_fused_rmsnorm": true, "cp_window_size": 2}'])
    assert not got.problems
    assert got.values["use_distributed_optimizer"] is False and got.values["sequence_parallel"] is True
    assert got.values["recompute_modules"] == ["core_attn", "moe"]
    assert got.values["use_fused_rmsnorm"] is True and got.values["cp_window_size"] == 2


def test_swift_extra_kwargs_rejects_unknown_names(schema):
    got = swift.parse(schema, ["--megatron_extra_kwargs", '{"use_fused_rmsnrom": true}'])
    assert "did you mean '--use-fused-rmsnorm'" in got.problems[0]


def test_fsdp2_sections_value_maps_and_misplaced_keys(schema):
    got = fsdp2.parse(schema, {"ParallelArguments": {"tp_size": 2, "cp_type": "ulysses", "lr": 1.0},
                               "TrainingArguments": {"optimizer": "adamw", "lerning_rate": 3},
                               "Model": {}}, "f.yaml")
    assert got.values["tensor_model_parallel_size"] == 2
    assert got.values["context_parallel_algo"] == "ulysses_cp_algo"  # FSDP2 spelling -> canonical
    assert got.values["optimizer"] == "adam"                          # FSDP2 adamw is Megatron's adam
    text = "\n".join(got.problems)
    assert "key 'lr' belongs in section TrainingArguments" in text
    assert "'lerning_rate'" in text
    assert "unknown fsdp2 section 'Model'; did you mean 'ModelArguments'?" in text


def test_yaml_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ParallelArguments:\n  tp_size: 2\n  cp_size: [1, 2\n")
    with pytest.raises(UsageError) as exc:
        load_document(str(bad))
    assert f"{bad}:" in str(exc.value) and ":4:" in str(exc.value)


def test_canonical_config_file_and_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("parallel:\n  tensor_model_parallel_size: 2\nseq_length: 1024\n")
    report = validate(["--seq-length", "2048"], dialect="megatron", config=str(cfg), environ={})
    assert report.config.parallel.tensor_model_parallel_size == 2
    assert report.resolved.values["seq_length"] == 2048


def test_environment_variables_are_read_and_range_checked():
    report = validate([], dialect="megatron", environ={"HCCL_CONNECT_TIMEOUT": "60"})
    assert any(v.rule == "value.range" and "hccl_connect_timeout" in v.params for v in report.violations)
    with pytest.raises(UsageError, match="HCCL_EXEC_TIMEOUT"):
        validate([], dialect="megatron", environ={"HCCL_EXEC_TIMEOUT": "soon"})
