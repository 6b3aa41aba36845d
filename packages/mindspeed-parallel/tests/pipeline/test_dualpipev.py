"""DualPipeV over gloo equals one process running the chunks in sequence (loss and every grad)."""

import copy

import pytest
import torch
from pipeline_cases import MAX_ERR, make_chunks, make_data, mse, reference
from torch import nn

from mindspeed_kernels.testing import run_world
from mindspeed_parallel.pipeline.dualpipev import DualPipeV
from mindspeed_parallel.pipeline.simulator import build_dualpipev
from mindspeed_parallel.pipeline.weight_grad import WeightGradLinear, WeightGradStore, bind_weight_grad_store, convert_linears

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300)]


def assert_max_err(actual, expected, dtype, what):
    err = (actual.detach().double() - expected.detach().double()).abs().max().item()
    assert err <= MAX_ERR[dtype], f"{what}: max abs error {err:.3g} > {MAX_ERR[dtype]:g}"


class CountingDualPipeV(DualPipeV):
    """Overrides the F&B seam (still sequential) to prove the executor routes through it."""

    calls = 0

    def overlapped_forward_backward(self, forward, backward):
        self.calls += 1
        backward_first = self.calls % 2 == 0  # order inside the slot must not matter
        if backward_first:
            backward.run()
            return forward.run()
        return super().overlapped_forward_backward(forward, backward)


def world_dualpipev(rank, cases):
    import torch.distributed as dist

    pp = dist.get_world_size()
    for dtype_name, num_microbatches, dw_detach in cases:
        dtype = getattr(torch, dtype_name)
        chunks = make_chunks(2 * pp, dtype)
        inputs, labels = make_data(num_microbatches, dtype)
        expected_loss = reference(chunks, inputs, labels)
        mine = [convert_linears(copy.deepcopy(chunks[i])) for i in (rank, 2 * pp - 1 - rank)]
        for chunk in mine:
            chunk.zero_grad(set_to_none=True)
        pipe = CountingDualPipeV(mine, dw_detach=dw_detach)
        store, deferred = pipe.runner.store, []
        put = store.put
        store.put = lambda fn: (deferred.append(fn), put(fn))  # count dW closures actually deferred
        feed = (inputs, labels, mse) if rank == 0 else (None, None, None)
        loss = pipe.step(num_microbatches, *feed)
        what = f"pp={pp} {dtype_name} N={num_microbatches} dw_detach={dw_detach} rank {rank}"
        if rank == 0:
            assert_max_err(loss, expected_loss, dtype, f"{what} loss")
        else:
            assert loss is None
        for chunk_id, chunk in zip((rank, 2 * pp - 1 - rank), mine, strict=True):
            for (name, got), want in zip(chunk.named_parameters(), chunks[chunk_id].parameters(), strict=True):
                assert_max_err(got.grad, want.grad, dtype, f"{what} chunk {chunk_id} {name}.grad")
        ops = build_dualpipev(pp, num_microbatches, dw_detach).rank_ops[rank]
        assert pipe.calls == sum(op.kind == "FB" for op in ops) > 0, what
        # one Linear per chunk: each input-only backward defers exactly one dW closure
        assert len(deferred) == sum(op.kind == "b" for op in ops), what
        assert len(deferred) >= (pp if dw_detach else 0), what  # dw_detach: every cooldown has PP of them
        assert len(store) == 0, what


def _cases(pp):
    # dw_detach off/on in fp64, fp32 with an odd micro-batch count (N >= 2*PP is all DualPipeV needs)
    return [("float64", 2 * pp + 2, False), ("float64", 2 * pp + 2, True), ("float32", 2 * pp + 1, True)]


@pytest.mark.slow
def test_dualpipev_pp2_matches_single_process():
    run_world(world_dualpipev, 2, _cases(2), timeout_s=120)


@pytest.mark.slow
def test_dualpipev_pp4_matches_single_process():
    run_world(world_dualpipev, 4, _cases(4), timeout_s=120)


def test_weight_grad_linear_defers_dw_until_pop():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)).double()
    deferred = convert_linears(copy.deepcopy(plain))
    store = WeightGradStore()
    assert bind_weight_grad_store(deferred, store) == 2
    x = torch.randn(5, 8, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain(x1).square().sum().backward()
    with store.capture():
        deferred(x2).square().sum().backward()
    assert all(p.grad is None for p in deferred.parameters()) and len(store) == 1
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-12, rtol=0)
    store.pop()
    for got, want in zip(deferred.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-12, rtol=0)
    with pytest.raises(RuntimeError, match="empty queue"):
        store.pop()


def test_weight_grad_linear_without_capture_is_nn_linear():
    torch.manual_seed(0)
    layer = WeightGradLinear(6, 3).double()
    layer.weight_grad_store = WeightGradStore()
    ref = nn.Linear(6, 3).double()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    layer(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, atol=1e-12, rtol=0)


def test_bad_input_is_reported():
    with pytest.raises(TypeError, match="chunks"):
        DualPipeV([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="micro_batches >= 2"):
        build_dualpipev(4, 7)
