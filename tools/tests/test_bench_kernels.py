"""tools/bench/kernels.py: a tiny end-to-end run, the naive formulas it compares with, its targets."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "kernels.py"
sys.path.insert(0, str(BENCH.parent))

import kernels  # noqa: E402


@pytest.mark.slow
def test_quick_run_writes_a_row_per_op(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--repeats", "1", "--ops", "fused_linear_cross_entropy", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "memory ratio" in proc.stdout and "TARGETS: not checked (--quick)" in proc.stdout
    result = json.loads(out.read_text())
    assert result["quick"] and result["targets"] == []
    (row,) = result["rows"]
    assert row["op"] == "fused_linear_cross_entropy" and row["sizes"] == kernels.QUICK[row["op"]]
    for impl in ("ours", "naive"):
        assert len(row[impl]["times_s"]) == 2 and row[impl]["time_s"] > 0
        assert row[impl]["peak_bytes"] >= 0
    assert row["time_ratio"] > 0 and row["memory_ratio"] >= 0


def _run(op: str, impl: str):
    torch.manual_seed(0)  # both builders draw the same inputs in the same order
    run, leaves = kernels.BUILDERS[op](impl, kernels.QUICK[op], torch.device("cpu"))
    out = run()
    out.sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("op", list(kernels.BUILDERS))
def test_ours_and_naive_compute_the_same_thing(op):
    """The bench compares like with like: same inputs, same outputs and gradients."""
    ours, ours_grads = _run(op, "ours")
    naive, naive_grads = _run(op, "naive")
    torch.testing.assert_close(ours, naive, atol=1e-4, rtol=1e-4)
    for got, expected in zip(ours_grads, naive_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_targets_pass_fail_and_missing_ops():
    rows = [
        {"op": "fused_linear_cross_entropy", "memory_ratio": 0.2, "time_ratio": 1.6},
        {"op": "flash_attention", "error": "boom"},
    ]
    results = {(t["op"], t["what"]): t["passed"] for t in kernels.check_targets(rows)}
    assert results == {
        ("fused_linear_cross_entropy", "memory"): True,
        ("fused_linear_cross_entropy", "time"): False,
        ("flash_attention", "memory"): False,  # an errored measurement fails its target
    }
    assert kernels.check_targets([{"op": "rms_norm", "memory_ratio": 9.0}]) == []


def test_size_overrides():
    sizes = {"fused_linear_cross_entropy": {"tokens": 8, "vocab": 4}}
    kernels._parse_sets(["fused_linear_cross_entropy.tokens=16"], sizes)
    assert sizes["fused_linear_cross_entropy"] == {"tokens": 16, "vocab": 4}
    for bad in ("fused_linear_cross_entropy.seq=16", "nope.tokens=1", "fused_linear_cross_entropy.tokens=x"):
        with pytest.raises(SystemExit, match="expected OP.SIZE=INT"):
            kernels._parse_sets([bad], sizes)


def test_ratio_of_zero_is_nan():
    assert math.isnan(kernels._ratio(1.0, 0.0)) and kernels._ratio(1.0, 4.0) == 0.25
