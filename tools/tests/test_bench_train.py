"""tools/bench/train.py: a tiny end-to-end run (ours and the Hugging Face baseline) and its argument checks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train.py"
sys.path.insert(0, str(BENCH.parent))

import train  # noqa: E402


@pytest.mark.slow
def test_quick_run_prints_a_ratio_and_equal_losses(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ratio ours/hf" in proc.stdout and "loss trajectories agree" in proc.stdout
    row = json.loads(out.read_text())
    steps = train.QUICK["warmup"] + train.QUICK["steps"]
    for side in ("ours", "hf"):
        assert len(row[side]["times_s"]) == len(row[side]["losses"]) == len(row[side]["faults"]) == steps
        assert all(isinstance(n, int) and n >= 0 for n in row[side]["faults"])
        assert row[side]["tokens_per_s"] > 0 and all(math.isfinite(x) for x in row[side]["losses"])
    assert row["ratio"] > 0 and row["ratio_best"] > 0 and row["ratio_cpu"] > 0
    assert row["adamw"] == {"ours": "fused", "hf": "for-loop"}  # torch's CPU default for the baseline
    # the same initial weights, batches and optimizer: the trajectories agree step by step
    assert row["loss_max_abs_diff"] <= 1e-3


def test_adamw_kind_names_torchs_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train.adamw_kind([{"fused": True}, {"fused": True}], cpu) == "fused"
    assert train.adamw_kind([{"fused": None, "foreach": None}], cpu) == "for-loop"
    assert train.adamw_kind([{"fused": None, "foreach": None}], cuda) == "foreach"
    assert train.adamw_kind([{"fused": False, "foreach": True}], cpu) == "foreach"


def test_summarise_ratios_skip_warmup():
    sizes = {"micro": 2, "seq": 8, "warmup": 1, "steps": 3}
    args = train.parse_args(["--accum", "2"])
    out = {"ours": {"times_s": [9.0, 1.0, 2.0, 3.0], "cpu_s": [9.0, 1.0, 1.0, 1.0], "faults": [900, 0, 5, 7],
                    "losses": [5.0, 4.0, 3.0, 2.0]},
           "hf": {"times_s": [9.0, 2.0, 4.0, 6.0], "cpu_s": [1.0, 3.0, 3.0, 3.0], "faults": [0, 40, 10, 20],
                  "losses": [5.0, 4.0, 3.5, 2.0]}}  # fmt: skip
    row = train.summarise(out, sizes, args)
    assert row["tokens_per_step"] == 32
    assert row["ours"]["median_s"] == 2.0 and row["hf"]["best_s"] == 2.0
    assert row["ours"]["tokens_per_s"] == 16.0 and row["ratio"] == 2.0 and row["ratio_best"] == 2.0
    assert row["ratio_cpu"] == 3.0  # the warm-up step's CPU time is left out too
    assert row["ours"]["median_faults"] == 5 and row["hf"]["median_faults"] == 20  # and its page faults
    assert row["loss_max_abs_diff"] == 0.5


def test_sizes_defaults_overrides_and_bad_values():
    assert train._sizes(train.parse_args([])) == train.FULL
    assert train._sizes(train.parse_args(["--quick", "--seq", "16"])) == {**train.QUICK, "seq": 16}
    with pytest.raises(SystemExit, match="--steps 0: must be >= 1"):
        train._sizes(train.parse_args(["--steps", "0"]))
    with pytest.raises(SystemExit, match="hidden must divide by heads"):
        train._sizes(train.parse_args(["--hidden", "30", "--heads", "4"]))


def test_launch_flags_are_a_valid_launch(tmp_path):
    """The flags ours gets validate as a `mindspeed train` launch with the requested settings."""
    from mindspeed_train import launch

    sizes = train._sizes(train.parse_args(["--quick"]))
    model = train.write_model(tmp_path, "qwen2", sizes)
    args = train.parse_args(["--lr", "2e-3", "--weight-decay", "0.05", "--clip-grad", "0.5", "--accum", "2"])
    config = launch.build_config(train.launch_flags(model, "data/x_text_document", sizes, args, iters=3))
    assert config.batch.num_microbatches == 2 and config.batch.micro == sizes["micro"] and config.train_iters == 3
    opt = config.optim
    assert (opt.lr, opt.min_lr, opt.weight_decay, opt.clip_grad, opt.lr_decay_style) == (2e-3, 2e-3, 0.05, 0.5, "constant")


def test_route_linears_gives_the_baseline_the_kernels_gemm(monkeypatch):
    from mindspeed_kernels.backends.reference import gemm

    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4, bias=False))
    x = torch.randn(3, 5, 8)
    expected = model(x)
    calls = []
    real = gemm.linear
    monkeypatch.setattr(gemm, "linear", lambda *a: calls.append(len(a)) or real(*a))
    from mindspeed_kernels.backends import reference

    monkeypatch.setitem(reference.OPS, "linear", gemm.linear)
    train.route_linears(model)
    torch.testing.assert_close(model(x), expected)
    assert len(calls) == 2
    cpu = torch.device("cpu")
    monkeypatch.delenv(gemm.ENV_VAR, raising=False)
    if torch.backends.mkldnn.is_available():
        assert train.gemm_kind(cpu, True) == "oneDNN"
    monkeypatch.setenv(gemm.ENV_VAR, "torch")
    assert train.gemm_kind(cpu, True) == "torch" and train.gemm_kind(cpu, False) == "torch"
    assert train.gemm_kind(torch.device("cuda"), True) == "torch"
