"""The test helpers: tolerance checks and the multi-process harness (a failure or hang must fail)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mindspeed_kernels.testing import assert_close, assert_error_within, run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(120)]


def sums_ranks(rank, expected):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == expected, t


def raises_on_rank_one(rank):
    if rank == 1:  # rank 0 returns normally: the only error is this one
        raise RuntimeError("rank one failed")


def hangs(rank):
    time.sleep(3600)


def test_collective_runs_on_every_rank():
    run_world(sums_ranks, 2, 3.0)


def test_a_failing_rank_fails_the_call():
    with pytest.raises(mp.ProcessRaisedException, match="rank one failed"):
        run_world(raises_on_rank_one, 2, timeout_s=20)


def test_a_hang_fails_instead_of_blocking():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 4 s"):
        run_world(hangs, 2, timeout_s=2)
    assert time.monotonic() - start < 30


def test_tolerance_helpers_reject_what_they_should():
    x = torch.ones(4)
    assert_close(x + 5e-6, x)
    with pytest.raises(AssertionError):
        assert_close(x + 1e-3, x)
    exact = torch.linspace(-1, 1, 64)
    assert_error_within(exact.bfloat16(), exact.bfloat16(), exact)
    with pytest.raises(AssertionError, match="x naive low-precision error"):
        assert_error_within(exact + 0.1, exact.bfloat16(), exact)
