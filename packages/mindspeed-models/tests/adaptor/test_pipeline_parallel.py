"""megatron-core pipeline schedules on CPU through the adaptor: get_forward_backward_func with PP=2,
1F1B (tied embeddings, 2 layers) and interleaved (VPP=2, 4 layers), gives the per-microbatch losses
and the gradients of megatron's own PP=1 run over the same 4 microbatches."""

from __future__ import annotations

import models_mcore_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)
import pytest
import torch

from mindspeed_kernels.testing import assert_close, run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]
MICROBATCHES, MICRO_BATCH_SIZE = 4, 2


def _check_schedule(micro, num_layers: int, vpp: int | None, tied: bool) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    helpers.init_parallel()
    ref = helpers.build_gpt(helpers.tiny_config(num_layers=num_layers), share_embeddings_and_output_weights=tied)
    ref_losses = helpers.run_schedule([ref], micro)
    ref_grads = {name: p.grad.clone() for name, p in ref.named_parameters()}
    full = helpers.full_state(ref)

    helpers.init_parallel(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=vpp)
    config = helpers.tiny_config(num_layers=num_layers, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=vpp)
    stages = [None] if vpp is None else list(range(vpp))
    chunks = [helpers.build_gpt(config, vp_stage=v, share_embeddings_and_output_weights=tied) for v in stages]
    for chunk in chunks:
        helpers.load_full(chunk, full)
    wrapped = [helpers.wrap_ddp(config, chunk) for chunk in chunks]
    losses = helpers.run_schedule(wrapped, micro)
    finalize_model_grads(wrapped)  # sums the tied embedding's grads over the first and last stage

    if ps.is_pipeline_last_stage():
        assert len(losses) == MICROBATCHES
        assert_close(torch.stack(losses), torch.stack(ref_losses))
    seen = set()
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            ref_name = helpers.reference_name(chunk, name, full)
            assert_close(param.main_grad, ref_grads[ref_name])
            seen.add(ref_name)
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, seen)
    assert set().union(*everyone) == set(full), "every reference parameter lives on some stage"


def _pipeline_world(rank: int) -> None:
    from mindspeed_models.adaptor import install

    install("cpu")
    micro = [helpers.batch(seed=20 + i, micro_batch=MICRO_BATCH_SIZE) for i in range(MICROBATCHES)]
    _check_schedule(micro, num_layers=2, vpp=None, tied=True)  # 1F1B; tied weights use .cuda() under PP
    _check_schedule(micro, num_layers=4, vpp=2, tied=False)  # interleaved


def test_pp2_1f1b_and_interleaved_match_pp1():
    run_world(_pipeline_world, 2, timeout_s=120)
