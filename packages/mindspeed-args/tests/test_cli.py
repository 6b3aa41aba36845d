"""`mindspeed args` end to end: exit codes 0/1/2, one-line errors, show/list/convert output."""

from __future__ import annotations

from pathlib import Path

from mindspeed_args.docs import render

ACCEPTANCE = ["--context-parallel-size", "4", "--context-parallel-algo", "megatron_cp_algo", "--seq-length", "100",
              "--num-attention-heads", "8", "--use-mcore-models"]


def test_acceptance_example_exits_1_and_names_the_multiple(run_cli, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, out, _ = run_cli("validate", "--dialect", "megatron", "--", *ACCEPTANCE)
    assert code == 1
    line = next(x for x in out.splitlines() if "[cp.ring.seq-length]" in x)
    assert "seq_length=100" in line and "multiple of 2 x context_parallel_size = 8" in line and "104" in line


def test_unknown_flag_is_exit_2_with_one_line_per_problem(run_cli):
    code, out, err = run_cli("validate", "--", "--seq-lenght", "8", "--num-layers", "two")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all(x.startswith("error: ") for x in lines)
    assert "did you mean '--seq-length'" in lines[0]


def test_missing_config_file_is_exit_2(run_cli, tmp_path):
    code, _, err = run_cli("validate", "--dialect", "fsdp2", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in err and "Traceback" not in err


def test_show_accepts_any_spelling_and_reports_dialect_defaults(run_cli):
    for spelling in ("--use-distributed-optimizer", "use_distributed_optimizer"):
        code, out, _ = run_cli("show", spelling)
        assert code == 0
        assert "megatron" in out and "swift" in out and "defaults differ" in out
    code, out, _ = run_cli("show", "cutoff_len")
    assert code == 0 and out.startswith("seq_length")
    code, _, err = run_cli("show", "seq_lenght")
    assert code == 2 and "seq_length" in err


def test_list_by_group(run_cli):
    code, out, _ = run_cli("list", "--group", "context_parallel")
    assert code == 0 and "context_parallel_algo" in out and "ulysses_degree_in_cp" in out


def test_convert_prints_the_translation(run_cli, tmp_path):
    launch = tmp_path / "launch.sh"
    launch.write_text("torchrun pretrain_gpt.py \\\n  --tensor-model-parallel-size 2 \\\n  --use-fused-rmsnorm  # fused\n")
    code, out, _ = run_cli("convert", "--from", "megatron", "--to", "swift", str(launch))
    assert code == 0
    assert "--tensor_model_parallel_size 2" in out and '"use_fused_rmsnorm":true' in out


def test_docs_args_md_is_up_to_date():
    root = next(p for p in Path(__file__).resolve().parents if (p / "noxfile.py").exists())
    assert (root / "docs" / "args.md").read_text(encoding="utf-8") == render(), \
        "docs/args.md is stale: run python tools/gen_args_docs.py"
