"""megatron's gradient_accumulation_fusion on CPU through the adaptor's stand-in for apex's
``fused_weight_gradient_mlp_cuda``: the linear backward adds each weight gradient straight into
megatron DDP's ``main_grad`` buffer.

References are torch's: a plain ``grad_output^T @ input`` for the stand-in, and plain autograd
``param.grad`` of the same GPTModel without the fusion (no DDP) for the end-to-end check.
"""

from __future__ import annotations

import sys

import models_mcore_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)
import pytest
import torch

from mindspeed_kernels.testing import assert_close, run_world
from mindspeed_models.adaptor import cpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wgrad_gemm_accum_adds_the_weight_gradient_into_main_grad(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, generator=gen).to(dtype)  # [S, B, in]
    g = torch.randn(5, 3, 6, generator=gen).to(dtype)  # [S, B, out]
    start = torch.randn(6, 8, generator=gen)
    main_grad = start.clone()
    cpu.wgrad_gemm_accum(x, g, main_grad)
    expected = start + (g.reshape(-1, 6).t() @ x.reshape(-1, 8)).float()
    assert main_grad.dtype == torch.float32
    assert_close(main_grad, expected)


def test_stand_in_is_used_only_where_apex_is_missing():
    factory = cpu.REPLACEMENTS[("tensor_parallel.layers", "fused_weight_gradient_mlp_cuda")]
    assert factory(cpu.MISSING) is cpu.WGRAD_ACCUMULATION
    assert factory(len) is len
    assert cpu.REPLACEMENTS[("tensor_parallel.layers", "_grad_accum_fusion_available")](False) is True


def _reference_grads(data_list, full, tied: bool) -> dict[str, torch.Tensor]:
    """Autograd gradients, summed over the microbatches, of the unfused model (no DDP)."""
    model = helpers.build_gpt(helpers.tiny_config(), share_embeddings_and_output_weights=tied)
    helpers.load_full(model, full)
    for data in data_list:
        model(input_ids=data["input_ids"], position_ids=data["position_ids"], attention_mask=None,
              labels=data["labels"]).mean().backward()  # fmt: skip
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _fusion_world(rank: int) -> None:
    from mindspeed_models.adaptor import install

    assert "megatron.core" not in sys.modules, "this world installs before megatron-core is imported"
    install("cpu")
    helpers.init_parallel(tensor_model_parallel_size=1)
    data_list = [helpers.batch(seed=3), helpers.batch(seed=4)]  # two microbatches accumulate
    for tied in (False, True):
        config = helpers.tiny_config(gradient_accumulation_fusion=True)
        model = helpers.build_gpt(config, share_embeddings_and_output_weights=tied)
        full = helpers.full_state(model)
        ddp = helpers.wrap_ddp(config, model)
        ddp.zero_grad_buffer()
        for data in data_list:
            ddp(input_ids=data["input_ids"], position_ids=data["position_ids"], attention_mask=None,
                labels=data["labels"]).mean().backward()  # fmt: skip
        expected = _reference_grads(data_list, full, tied)
        fused = [name for name, p in model.named_parameters() if getattr(p, "grad_added_to_main_grad", False)]
        assert "decoder.layers.0.mlp.linear_fc1.weight" in fused, fused  # the fused path ran
        for name, param in model.named_parameters():
            try:
                assert_close(param.main_grad, expected[name])
            except AssertionError as exc:
                raise AssertionError(f"tied={tied} {name}: {exc}") from None


@pytest.mark.xdist_group("gloo")
@pytest.mark.timeout(240)
def test_fused_accumulation_equals_autograd_over_two_microbatches_tied_and_untied():
    run_world(_fusion_world, 1, timeout_s=120)
