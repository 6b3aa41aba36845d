"""The one place the stack asks about hardware: device kind, collective backend, memory, seeds.

``device_type()`` is ``"npu"`` when torch_npu is importable and sees a device, else ``"cuda"``
when CUDA is available, else ``"cpu"``. Memory statistics are bytes: peak *allocated* memory on
accelerators (the caching allocator's counters) and peak *resident set size* on CPU (Linux
``VmHWM``, reset through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``, not resettable).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

COLLECTIVE_BACKEND = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@functools.cache
def _torch_npu() -> ModuleType | None:
    """torch_npu when it is installed (importing it registers the ``npu`` device), else None."""
    if importlib.util.find_spec("torch_npu") is None:
        return None
    return importlib.import_module("torch_npu")


def _device_module(kind: str):
    return getattr(torch, kind) if kind in ("npu", "cuda") else None


def device_type() -> str:
    """``"npu"``, ``"cuda"`` or ``"cpu"``: the accelerator this process would use."""
    if _torch_npu() is not None and torch.npu.is_available():
        return "npu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_count(kind: str | None = None) -> int:
    """Number of devices of ``kind`` (default: :func:`device_type`); 1 for CPU."""
    kind = kind or device_type()
    return 1 if kind == "cpu" else _device_module(kind).device_count()


def current_device(kind: str | None = None) -> torch.device:
    """The device this process computes on (its current accelerator index, or CPU)."""
    kind = kind or device_type()
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, _device_module(kind).current_device())


def collective_backend(kind: str | None = None) -> str:
    """The torch.distributed backend for ``kind``: hccl (npu), nccl (cuda), gloo (cpu)."""
    kind = kind or device_type()
    if kind not in COLLECTIVE_BACKEND:
        raise ValueError(f"unknown device type {kind!r}; expected one of {', '.join(COLLECTIVE_BACKEND)}")
    return COLLECTIVE_BACKEND[kind]


def synchronize(kind: str | None = None) -> None:
    """Wait for queued device work (a no-op on CPU) — call before reading a timer."""
    kind = kind or device_type()
    if kind != "cpu":
        _device_module(kind).synchronize()


@dataclass(frozen=True)
class MemoryStats:
    """Memory of this process in bytes. ``kind`` is ``"allocated"`` (accelerator) or ``"rss"`` (CPU)."""

    device_type: str
    kind: str
    current_bytes: int
    peak_bytes: int


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _cpu_rss() -> tuple[int, int]:
    current, peak = _proc_status_kib("VmRSS"), _proc_status_kib("VmHWM")
    if current is None or peak is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_bytes = maxrss if sys.platform == "darwin" else maxrss * 1024
        return peak_bytes, peak_bytes
    return current * 1024, peak * 1024


def memory_stats(kind: str | None = None) -> MemoryStats:
    """Current and peak memory: allocated bytes on accelerators, resident set size on CPU."""
    kind = kind or device_type()
    if kind == "cpu":
        current, peak = _cpu_rss()
        return MemoryStats("cpu", "rss", current, peak)
    mod = _device_module(kind)
    return MemoryStats(kind, "allocated", mod.memory_allocated(), mod.max_memory_allocated())


def reset_peak_memory(kind: str | None = None) -> bool:
    """Start a new peak-memory window; False when the platform cannot reset it (non-Linux CPU)."""
    kind = kind or device_type()
    if kind != "cpu":
        _device_module(kind).reset_peak_memory_stats()
        return True
    try:
        _CLEAR_REFS.write_text("5")  # Linux: "5" resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def manual_seed(seed: int) -> None:
    """Seed torch's CPU generator and every accelerator's default generators."""
    torch.manual_seed(seed)
    kind = device_type()
    if kind != "cpu":
        _device_module(kind).manual_seed_all(seed)


def generator(seed: int, device: torch.device | str | None = None) -> torch.Generator:
    """A fresh generator on ``device`` (default: :func:`current_device`) seeded with ``seed``."""
    gen = torch.Generator(device=device if device is not None else current_device())
    gen.manual_seed(seed)
    return gen
