"""Tolerances, comparisons and a multi-process harness for tests (this package's, and those of
downstream packages that test code built on these ops)."""

from __future__ import annotations

import importlib.util
import inspect
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Per-dtype (atol, rtol) for comparing an op with the same formula evaluated in float32.
# Half-precision rows allow a few units in the last place of the output dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0) -> None:
    """``actual`` ~ ``expected`` within ``TOLERANCES[dtype]`` times ``scale`` (dtype defaults to
    ``actual.dtype``); both are compared in float64 so the expected value may be float32."""
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.detach().to(torch.float64),
        expected.detach().to(torch.float64),
        atol=atol * scale,
        rtol=rtol * scale,
        equal_nan=True,
    )


def assert_error_within(actual: torch.Tensor, naive_low: torch.Tensor, exact: torch.Tensor, factor: float = 2.0) -> None:
    """Half-precision check used by FlashAttention's own tests: the op's max error against the
    float32 ``exact`` result is at most ``factor`` times the naive low-precision formula's error
    (plus one float32 epsilon of ``exact``'s scale)."""
    exact64 = exact.detach().to(torch.float64)
    ours = (actual.detach().to(torch.float64) - exact64).abs().max().item()
    naive = (naive_low.detach().to(torch.float64) - exact64).abs().max().item()
    floor = torch.finfo(torch.float32).eps * max(exact64.abs().max().item(), 1.0)
    assert ours <= factor * naive + floor, f"max error {ours:.3g} > {factor} x naive low-precision error {naive:.3g}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``init_process_group``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(fn: Callable, world_size: int, *args, timeout_s: float = 90.0, backend: str = "gloo") -> None:
    """Run ``fn(rank, *args)`` in ``world_size`` spawned processes joined in one process group.

    ``fn`` must be a module-level function; each child loads its defining file by path, so test
    modules that are not importable by name (pytest's importlib mode) work. A child that raises
    fails the call with its traceback; collectives time out after ``timeout_s`` and the whole run
    is killed after ``2 * timeout_s``, so a hang fails instead of blocking CI.
    """
    target = (inspect.getfile(fn), fn.__qualname__)
    context = mp.start_processes(
        _child, args=(target, free_port(), world_size, backend, timeout_s, args),
        nprocs=world_size, join=False, start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + 2 * timeout_s
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__qualname__}: {world_size} processes did not finish within {2 * timeout_s:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _child(rank: int, target: tuple[str, str], port: int, world_size: int, backend: str, timeout_s: float, args) -> None:
    path, qualname = target
    name = f"_mindspeed_world_{Path(path).stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )
    try:
        getattr(module, qualname)(rank, *args)
    finally:
        dist.destroy_process_group()
