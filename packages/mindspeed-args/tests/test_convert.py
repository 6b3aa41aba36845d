"""Translation between dialects keeps every value (round trips) and maps FSDP2's compounds."""

from __future__ import annotations

import pytest
import yaml

from mindspeed_args.convert import convert
from mindspeed_args.dialects.flags import split_shell
from mindspeed_args.errors import UsageError
from mindspeed_args.validate import read_inputs, resolve

MEGATRON = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--seq-length", "4096",
            "--micro-batch-size", "1", "--global-batch-size", "64", "--lr", "3e-4", "--use-mcore-models",
            "--use-fused-rmsnorm", "--lora-target-modules", "linear_qkv", "linear_proj", "--no-input-jitter",
            "--context-parallel-algo", "megatron_cp_algo", "--moe-layer-freq", "[1]*3+[0]"]


def values(schema, dialect, argv=(), config=None):
    return dict(resolve(schema, dialect, read_inputs(schema, dialect, list(argv), config, {})).values)


def test_megatron_swift_megatron_round_trip_keeps_every_value(schema):
    original = values(schema, "megatron", MEGATRON)
    as_swift = convert("megatron", "swift", argv=MEGATRON).text
    assert "--use_distributed_optimizer false" in as_swift  # swift's default differs: written out
    assert "--megatron_extra_kwargs" in as_swift               # MindSpeed-only flags ride along
    assert values(schema, "swift", split_shell(as_swift)) == original
    back = convert("swift", "megatron", argv=split_shell(as_swift)).text
    assert values(schema, "megatron", split_shell(back)) == original


def test_fsdp2_megatron_fsdp2_round_trip(schema, tmp_path):
    src = tmp_path / "f.yaml"
    src.write_text(yaml.safe_dump({
        "ModelArguments": {"model_name_or_path": "./m"},
        "DataArguments": {"dataset": "./d.json", "cutoff_len": 1024},
        "ParallelArguments": {"tp_size": 2, "recompute": True},
        "TrainingArguments": {"output_dir": "./o", "per_device_train_batch_size": 2,
                              "gradient_accumulation_steps": 4, "max_steps": 100, "lr": 2e-5}}))
    meg = convert("fsdp2", "megatron", str(src), world_size=8)
    flags = split_shell(meg.text)
    assert flags[flags.index("--global-batch-size") + 1] == "32"       # dp 4 x 2 x 4
    assert "--recompute-granularity" in flags and flags[flags.index("--data-path") + 1] == "./d.json"
    out = tmp_path / "back.yaml"
    out.write_text(convert("megatron", "fsdp2", argv=flags, world_size=8).text)
    # Megatron flags cannot unset a parameter: FSDP2 leaves preprocessing_num_workers unset, and
    # in Megatron an absent --workers means 1. That one loss is expected, and must be announced.
    before, after = values(schema, "fsdp2", config=str(src)), values(schema, "fsdp2", config=str(out))
    assert {k for k in before if before[k] != after[k]} == {"workers"}
    assert any(n.startswith("workers:") for n in meg.notes)


def test_batch_translation_needs_the_world_size(tmp_path):
    src = tmp_path / "f.yaml"
    src.write_text("TrainingArguments: {output_dir: o, max_steps: 5}\nModelArguments: {model_name_or_path: m}\n")
    with pytest.raises(UsageError, match="--world-size"):
        convert("fsdp2", "megatron", str(src))


def test_untranslatable_settings_are_named():
    with pytest.raises(UsageError) as exc:
        convert("megatron", "fsdp2", argv=["--pipeline-model-parallel-size", "2", "--num-layers", "4"], world_size=2)
    text = str(exc.value)
    assert "pipeline_model_parallel_size=2" in text and "num_layers=4" in text
