"""A world-size-1 runtime for using megatron-core models outside a launcher (tests, verify, notebooks).

megatron-core layers look up their process groups in ``megatron.core.parallel_state``; a
single process that never called ``torch.distributed.init_process_group`` has none. This
module creates a one-rank group (an in-process store: no port, no rendezvous) and megatron's
default parallel state (TP = PP = CP = EP = 1) when, and only when, none exists.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mindspeed_kernels import accelerator

__all__ = ["ensure_parallel_state"]


def _groups_alive() -> bool:
    """Whether megatron's groups belong to the current process group (torch raises for others)."""
    try:
        dist.get_world_size(group=parallel_state.get_tensor_model_parallel_group())
    except (ValueError, RuntimeError):
        return False
    return True


def ensure_parallel_state(seed: int = 1234) -> bool:
    """Make megatron's parallel state usable in this process; True if this call created it.

    Without ``torch.distributed``: a 1-rank group on ``accelerator.collective_backend()`` (gloo
    on CPU) plus ``parallel_state.initialize_model_parallel()`` with all sizes 1. With a group
    of one rank but no megatron state: the latter only. With several ranks and no megatron
    state: ValueError, since the parallel layout is the launcher's decision. When it creates
    the state on an accelerator it also seeds megatron's RNG tracker with ``seed`` (on-device
    weight initialisation draws from it); on CPU, where weights are initialised on the host,
    torch's generators are left alone (seed the tracker yourself before dropout training).
    """
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend=accelerator.collective_backend(), store=dist.HashStore(), rank=0, world_size=1)
        created = True
    if parallel_state.model_parallel_is_initialized() and not _groups_alive():
        # megatron's groups outlived the process group they were made from (destroyed since, e.g.
        # by an earlier job in this process): they are unusable, so build them again
        parallel_state.destroy_model_parallel()
    if parallel_state.model_parallel_is_initialized():
        return created
    if dist.get_world_size() != 1:
        raise ValueError(
            f"torch.distributed has {dist.get_world_size()} ranks but megatron's parallel state is not set up; "
            "call megatron.core.parallel_state.initialize_model_parallel(...) before building models"
        )
    parallel_state.initialize_model_parallel()
    if accelerator.device_type() != "cpu":
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return True
