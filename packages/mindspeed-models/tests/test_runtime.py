"""ensure_parallel_state: creates a one-rank runtime only when none exists, never guesses a multi-rank layout."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mindspeed_kernels.testing import run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300)]


def test_single_process_runtime_is_idempotent():
    from megatron.core import parallel_state

    from mindspeed_models import ensure_parallel_state

    ensure_parallel_state()
    assert dist.is_initialized() and dist.get_world_size() == 1
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    assert parallel_state.get_pipeline_model_parallel_world_size() == 1
    assert ensure_parallel_state() is False  # already there: nothing created


def _multi_rank(rank: int) -> None:
    from megatron.core import parallel_state

    from mindspeed_models import ensure_parallel_state

    with pytest.raises(ValueError, match="2 ranks but megatron's parallel state is not set up"):
        ensure_parallel_state()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    assert ensure_parallel_state() is False
    assert parallel_state.get_tensor_model_parallel_world_size() == 2


@pytest.mark.slow
def test_multi_rank_world_needs_an_explicit_layout():
    run_world(_multi_rank, 2, timeout_s=120)


def _stale_groups(rank: int) -> None:
    """A job that destroyed (or replaced) its process group but left megatron's state behind
    must not break the next model build in the same process."""
    from megatron.core import parallel_state

    from mindspeed_models import ensure_parallel_state

    ensure_parallel_state()
    dist.destroy_process_group()  # megatron's groups now belong to no process group
    assert ensure_parallel_state() is True
    dist.all_reduce(torch.zeros(1), group=parallel_state.get_tensor_model_parallel_group())
    dist.destroy_process_group()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # a new group, stale megatron state
    ensure_parallel_state()
    dist.all_reduce(torch.zeros(1), group=parallel_state.get_data_parallel_group())
    parallel_state.destroy_model_parallel()


def test_stale_megatron_groups_are_rebuilt():
    run_world(_stale_groups, 1, timeout_s=60)
