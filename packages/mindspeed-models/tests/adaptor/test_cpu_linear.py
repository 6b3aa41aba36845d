"""The CPU linear row (``adaptor/cpu_linear.py``) against megatron's own linear function and torch
autograd, in this process (megatron imported, the adaptor installed, a one-rank parallel state)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mindspeed_kernels.testing import assert_close
from mindspeed_models import adaptor, runtime
from mindspeed_models.adaptor import cpu_linear

S, B, K, N = 64, 4, 128, 192  # 256 tokens: 6.3M multiply-adds per GEMM, above the kernels' oneDNN threshold


@pytest.fixture(scope="module")
def layers():
    adaptor.install("cpu")
    runtime.ensure_parallel_state()
    import megatron.core.tensor_parallel.layers as layers

    return layers


def _inputs(bias: bool, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(S, B, K, generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(dtype).requires_grad_(True)
    b = torch.randn(N, generator=gen).to(dtype).requires_grad_(True) if bias else None
    g = torch.randn(S, B, N, generator=gen).to(dtype)
    return x, w, b, g


def _run(fn, x, w, b, g, fusion: bool):
    """Output, input grad, weight grad (main_grad under fusion), bias grad, and the autograd weight grad."""
    x, w = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True) if b is not None else None
    if fusion:
        w.main_grad = torch.full(w.shape, 0.5)  # accumulates on top of what the buffer held
        w.grad_added_to_main_grad = False  # as megatron's DDP sets it
    out = fn(input=x, weight=w, bias=b, gradient_accumulation_fusion=fusion, allreduce_dgrad=False,
             sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=0, tp_group=None)  # fmt: skip
    out.backward(g)
    weight_grad = w.main_grad if fusion else w.grad
    return out, x.grad, weight_grad, (b.grad if b is not None else None), w


@pytest.mark.parametrize("fusion", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_linear_equals_megatrons_function_and_torch(layers, fusion, bias, monkeypatch):
    fn = layers.linear_with_grad_accumulation_and_async_allreduce
    assert fn.__wrapped__ is not None and fn is not fn.__wrapped__  # the row is installed
    calls = []
    real = cpu_linear._KernelLinear.apply
    monkeypatch.setattr(cpu_linear._KernelLinear, "apply", lambda *a: calls.append(1) or real(*a))
    x, w, b, g = _inputs(bias)
    ours = _run(fn, x, w, b, g, fusion)
    assert calls == [1]
    megatrons = _run(fn.__wrapped__, x, w, b, g, fusion)
    for got, want in zip(ours[:4], megatrons[:4], strict=True):
        if want is None:
            assert got is None
        else:
            assert_close(got, want)
    # torch autograd of F.linear: the same numbers without either implementation
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    br = b.detach().clone().requires_grad_(True) if b is not None else None
    expected = F.linear(xr, wr, br)
    expected.backward(g)
    assert_close(ours[0], expected)
    assert_close(ours[1], xr.grad)
    assert_close(ours[2], wr.grad + 0.5 if fusion else wr.grad)
    if fusion:
        assert ours[4].grad_added_to_main_grad is True


def test_other_calls_go_to_megatrons_function(layers):
    seen = []

    def original(*args):
        seen.append(args)
        return "megatron"

    fn = cpu_linear.kernel_linear_factory(original)
    x, w, b, _ = _inputs(bias=True)
    common = dict(bias=b, gradient_accumulation_fusion=False, allreduce_dgrad=False)
    assert fn(x.bfloat16(), w.bfloat16(), sequence_parallel=False, **{**common, "bias": None}) == "megatron"
    assert fn(x, w, sequence_parallel=True, **common) == "megatron"
    assert fn(x, w, sequence_parallel=False, grad_output_buffer=[], **common) == "megatron"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fn(x, w, sequence_parallel=False, **common) == "megatron"
    assert len(seen) == 4 and all(len(args) == 10 for args in seen)
    out = fn(x, w, sequence_parallel=False, **common)
    assert_close(out, F.linear(x, w, b))


def test_column_and_row_parallel_linears_take_the_kernel_path(layers, monkeypatch):
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=K, num_attention_heads=4, use_cpu_initialization=True,
                               gradient_accumulation_fusion=False)  # fmt: skip
    init = torch.nn.init.normal_
    column = layers.ColumnParallelLinear(K, N, config=config, init_method=init, bias=True, gather_output=False)
    row = layers.RowParallelLinear(N, K, config=config, init_method=init, bias=True, input_is_parallel=True,
                                   skip_bias_add=False)  # fmt: skip
    calls = []
    real = cpu_linear._KernelLinear.apply
    monkeypatch.setattr(cpu_linear._KernelLinear, "apply", lambda *a: calls.append(1) or real(*a))
    x = _inputs(bias=False)[0]
    hidden, _ = column(x)
    out, _ = row(hidden)
    assert len(calls) == 2
    assert_close(out, F.linear(F.linear(x, column.weight, column.bias), row.weight, row.bias))
