"""ensure_parallel_state: creates a one-rank runtime only when none exists, never guesses a multi-rank layout."""

from __future__ import annotations

import pytest
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
