"""SwiGLUMLP (fc1's [gate; up] as two contiguous blocks) against megatron-core's own MLP: the same
weights give the same output, input gradient and weight gradient (autograd ``.grad``, and
``main_grad`` under gradient_accumulation_fusion with megatron DDP's placeholder protocol); the
cases the blocked path does not cover run megatron's forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from mindspeed_kernels.testing import assert_close
from mindspeed_models import mlp as mlp_module
from mindspeed_models.adaptor import install
from mindspeed_models.layers import SwiGLU
from mindspeed_models.mlp import ActivationRecomputeMLP, SwiGLUMLP, blocked_linear
from mindspeed_models.runtime import ensure_parallel_state

HIDDEN, FFN = 16, 24


def _config(**kw) -> TransformerConfig:
    base = dict(num_layers=1, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=2, normalization="RMSNorm",
                gated_linear_unit=True, activation_func=F.silu, use_cpu_initialization=True, add_bias_linear=False,
                bias_activation_fusion=False, hidden_dropout=0.0, cuda_graph_scope=[])  # fmt: skip
    return TransformerConfig(**{**base, **kw})


def _pair(cls=SwiGLUMLP, ref_module: bool = False, **kw) -> tuple[torch.nn.Module, MLP]:
    """(ours, megatron's MLP), same weights; megatron's chunk-and-silu activation, or with
    ``ref_module`` our SwiGLU module (the spec's MLP before SwiGLUMLP: megatron's forward exactly)."""
    install("cpu")  # megatron's CUDA RNG tracker (activation recompute) and main_grad accumulation on CPU
    ensure_parallel_state()
    linears = dict(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    module_config = _config(use_te_activation_func=True, **kw)
    with_module = dict(config=module_config, submodules=MLPSubmodules(activation_func=SwiGLU, **linears))
    ours = cls(**with_module, ffn_hidden_size=FFN)
    if ref_module:
        ref = MLP(**with_module, ffn_hidden_size=FFN)
    else:
        ref = MLP(_config(**kw), MLPSubmodules(**linears), ffn_hidden_size=FFN)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _run(module, x: torch.Tensor, weights: torch.Tensor):
    x = x.clone().requires_grad_()
    out, bias = module(x)
    ((out if bias is None else out + bias) * weights).sum().backward()
    return out.detach(), x.grad


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(5, 3, HIDDEN, generator=gen).to(dtype), torch.randn(5, 3, HIDDEN, generator=gen).to(dtype)


def _counting(fn, calls: list):
    def counted(*args):
        calls.append(1)
        return fn(*args)

    return counted


@pytest.mark.parametrize("cls", [SwiGLUMLP, ActivationRecomputeMLP])
def test_output_and_gradients_equal_megatrons_mlp(cls, monkeypatch):
    calls = []
    monkeypatch.setattr(mlp_module._BlockedLinear, "apply", _counting(mlp_module._BlockedLinear.apply, calls))
    ours, ref = _pair(cls)
    x, w = _inputs()
    out, gx = _run(ours, x, w)
    out_ref, gx_ref = _run(ref, x, w)
    assert calls, "the blocked path did not run"
    assert_close(out, out_ref)
    assert_close(gx, gx_ref)
    for name, param in ours.named_parameters():
        assert_close(param.grad, dict(ref.named_parameters())[name].grad)


def test_bfloat16_matches_megatrons_mlp_in_float32_to_bfloat16_rounding():
    ours, ref = _pair()
    ours.to(torch.bfloat16)
    with torch.no_grad():  # the same bf16 values
        for (_, p_ref), (_, p) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
            p_ref.copy_(p)
    x, w = _inputs(torch.bfloat16)
    out, gx = _run(ours, x, w)
    out_ref, gx_ref = _run(ref, x.float(), w.float())
    assert out.dtype == gx.dtype == torch.bfloat16
    assert_close(out, out_ref)
    assert_close(gx, gx_ref)


def test_fused_accumulation_adds_into_main_grad_and_hands_ddp_a_placeholder():
    ours, ref = _pair(gradient_accumulation_fusion=True)
    ref.linear_fc1.gradient_accumulation_fusion = ref.linear_fc2.gradient_accumulation_fusion = False
    weight = ours.linear_fc1.weight
    start = torch.randn(weight.shape)
    weight.main_grad = start.clone()
    weight.grad_added_to_main_grad = False  # as megatron's DDP sets it
    ours.linear_fc2.weight.main_grad = torch.zeros_like(ours.linear_fc2.weight)
    x, w = _inputs()
    for _ in range(2):  # two microbatches accumulate
        _run(ours, x, w)
        _run(ref, x, w)
    assert weight.grad_added_to_main_grad is True
    assert_close(weight.main_grad, start + ref.linear_fc1.weight.grad)
    assert weight.grad is not None and weight.grad.shape == weight.shape  # the placeholder megatron's DDP hooks on


def test_frozen_weight_gets_no_gradient():
    ours, ref = _pair()
    ours.linear_fc1.weight.requires_grad_(False)
    ref.linear_fc1.weight.requires_grad_(False)
    x, w = _inputs()
    _, gx = _run(ours, x, w)
    _, gx_ref = _run(ref, x, w)
    assert ours.linear_fc1.weight.grad is None
    assert_close(gx, gx_ref)


@pytest.mark.parametrize("case", ["fc1 bias", "hooked fc1", "wrapped fc1 impl", "autocast"])
def test_uncovered_cases_run_megatrons_forward(case, monkeypatch):
    calls = []
    monkeypatch.setattr(mlp_module._BlockedLinear, "apply", _counting(mlp_module._BlockedLinear.apply, calls))
    ours, ref = _pair(ref_module=True, add_bias_linear=case == "fc1 bias")
    if case == "hooked fc1":
        ours.linear_fc1.register_forward_pre_hook(lambda module, args: None)
    elif case == "wrapped fc1 impl":
        ours.linear_fc1._forward_impl = ours.linear_fc1._forward_impl  # an instance attribute, as DualPipe sets
    x, w = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out, gx = _run(ours, x, w)
        out_ref, gx_ref = _run(ref, x, w)
    assert not calls
    assert torch.equal(out, out_ref) and torch.equal(gx, gx_ref)


def test_blocked_linear_lays_gate_and_up_out_as_blocks():
    x = torch.randn(4, 3, 5)
    weight = torch.randn(8, 5)
    out = blocked_linear(x, weight)
    assert out.shape == (2, 4, 3, 4) and out.is_contiguous()
    assert_close(out[0], x @ weight[:4].t())
    assert_close(out[1], x @ weight[4:].t())
    with pytest.raises(ValueError, match=r"blocked_linear: weight \(7, 5\)"):
        blocked_linear(x, torch.randn(7, 5))
