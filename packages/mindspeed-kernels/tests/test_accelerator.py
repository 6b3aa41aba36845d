"""The hardware queries on a CPU-only machine (accelerator branches are covered by mapping, not run)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mindspeed_kernels import accelerator


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(accelerator, "_torch_npu", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cpu_queries(cpu_only):
    assert accelerator.device_type() == "cpu"
    assert accelerator.device_count() == 1
    assert accelerator.current_device() == torch.device("cpu")
    assert accelerator.collective_backend() == "gloo"
    accelerator.synchronize()  # no-op, must not raise


def test_collective_backend_table():
    assert [accelerator.collective_backend(k) for k in ("npu", "cuda", "cpu")] == ["hccl", "nccl", "gloo"]
    with pytest.raises(ValueError, match="unknown device type 'tpu'"):
        accelerator.collective_backend("tpu")


PEAK_PROBE = """
from mindspeed_kernels import accelerator
import torch
assert accelerator.reset_peak_memory()
before = accelerator.memory_stats()
assert before.kind == "rss" and before.peak_bytes >= before.current_bytes > 0
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written, so resident
del block
peak = accelerator.memory_stats().peak_bytes
assert peak - before.current_bytes >= 60 * 2**20, (peak, before)
accelerator.reset_peak_memory()
assert accelerator.memory_stats().peak_bytes < peak
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset is Linux-only")
def test_cpu_peak_rss_sees_an_allocation_and_resets():
    # A fresh process with glibc's mmap threshold fixed low: in a long-lived process the 64 MiB
    # could be served from freed, still-resident heap memory and never move the RSS.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


def test_seeded_generators_reproduce(cpu_only):
    a = torch.rand(4, generator=accelerator.generator(7))
    b = torch.rand(4, generator=accelerator.generator(7))
    assert torch.equal(a, b)
    accelerator.manual_seed(3)
    c = torch.rand(4)
    accelerator.manual_seed(3)
    assert torch.equal(c, torch.rand(4))
