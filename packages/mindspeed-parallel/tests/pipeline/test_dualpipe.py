"""DualPipe over gloo: both copies' gradients summed equal one process running the stages in
sequence over all micro-batches; the two ends' losses sum to the single-process mean loss."""

import copy

import pytest
import torch
from pipeline_cases import MAX_ERR, make_chunks, make_data, mse, reference
from torch import nn

from mindspeed_kernels.testing import run_world
from mindspeed_parallel.pipeline.dualpipe import DualPipe
from mindspeed_parallel.pipeline.simulator import build_dualpipe
from mindspeed_parallel.pipeline.weight_grad import convert_linears

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300)]


class CountingDualPipe(DualPipe):
    calls = 0

    def overlapped_forward_backward(self, forward, backward):
        self.calls += 1
        return super().overlapped_forward_backward(forward, backward)


def _flat_grads(module):
    return torch.cat([p.grad.reshape(-1) for p in module.parameters()])


def world_dualpipe(rank, cases):
    import torch.distributed as dist

    pp = dist.get_world_size()
    for dtype_name, num_microbatches, dw_detach in cases:
        dtype = getattr(torch, dtype_name)
        stages = make_chunks(pp, dtype)
        inputs, labels = make_data(num_microbatches, dtype)
        expected_loss = reference(stages, inputs, labels)
        half = num_microbatches // 2
        mine = [convert_linears(copy.deepcopy(stages[i])) for i in (rank, pp - 1 - rank)]
        pipe = CountingDualPipe(mine, dw_detach=dw_detach)
        if rank == 0:  # feeds stream 0 (first half), finishes stream 1 (second half)
            loss = pipe.step(num_microbatches, inputs[:half], labels[half:], mse)
        elif rank == pp - 1:
            loss = pipe.step(num_microbatches, inputs[half:], labels[:half], mse)
        else:
            loss = pipe.step(num_microbatches)
        what = f"pp={pp} {dtype_name} N={num_microbatches} dw_detach={dw_detach} rank {rank}"
        total = torch.zeros((), dtype=dtype) if loss is None else loss.clone()
        dist.all_reduce(total)
        err = (total.double() - expected_loss.double()).abs().item()
        assert err <= MAX_ERR[dtype], f"{what} loss error {err:.3g}"
        copy0 = [torch.empty_like(_flat_grads(mine[0])) for _ in range(pp)]
        copy1 = [torch.empty_like(_flat_grads(mine[1])) for _ in range(pp)]
        dist.all_gather(copy0, _flat_grads(mine[0]))
        dist.all_gather(copy1, _flat_grads(mine[1]))
        summed = copy0[rank] + copy1[pp - 1 - rank]  # stage `rank` of both copies
        err = (summed.double() - _flat_grads(stages[rank]).double()).abs().max().item()
        assert err <= MAX_ERR[dtype], f"{what} stage {rank} grads error {err:.3g}"
        fb_ops = sum(op.kind == "FB" for op in build_dualpipe(pp, num_microbatches, dw_detach).rank_ops[rank])
        assert pipe.calls == fb_ops > 0, what


def _cases(pp):
    return [("float64", 2 * pp + 2, False), ("float64", 2 * pp + 2, True), ("float32", 2 * pp, True)]


@pytest.mark.slow
def test_dualpipe_pp2_matches_single_process():
    run_world(world_dualpipe, 2, _cases(2), timeout_s=120)


@pytest.mark.slow
def test_dualpipe_pp4_matches_single_process():
    run_world(world_dualpipe, 4, _cases(4), timeout_s=120)


def test_bad_input_is_reported():
    with pytest.raises(TypeError, match="stages"):
        DualPipe([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="even pp"):
        build_dualpipe(3, 6)
