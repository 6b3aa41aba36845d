"""megatron-core DDP + the distributed optimizer on CPU through the adaptor: at DP=2 (half the batch
per rank) one Adam step with gradient clipping gives the parameters and the gradient norm of
torch's own Adam and clip_grad_norm_ on the whole batch in one process."""

from __future__ import annotations

import models_mcore_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)
import pytest
import torch

from mindspeed_kernels.testing import assert_close, run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]
LR, CLIP, BETAS, EPS = 1e-2, 0.5, (0.9, 0.95), 1e-8




def _loss(model, data):
    return model(input_ids=data["input_ids"], position_ids=data["position_ids"], attention_mask=None,
                 labels=data["labels"]).mean()  # fmt: skip


def _reference_step(model, data):
    """Whole batch, one process: torch's clip_grad_norm_ and Adam. Returns (grad norm, params)."""
    _loss(model, data).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    torch.optim.Adam(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0).step()
    return norm, {name: p.detach().clone() for name, p in model.named_parameters()}


def _ddp_world(rank: int) -> None:
    from mindspeed_models.adaptor import install

    install("cpu")
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    data = helpers.batch(seed=60, micro_batch=4)
    mine = {key: value[2 * rank : 2 * rank + 2] for key, value in data.items()}
    helpers.init_parallel()  # DP=2
    config = helpers.tiny_config()
    ref = helpers.build_gpt(config)
    full = helpers.full_state(ref)
    ref_norm, ref_params = _reference_step(ref, data)

    model = helpers.build_gpt(config)
    helpers.load_full(model, full)
    ddp = helpers.wrap_ddp(config, model, distributed_optimizer=True)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=LR, weight_decay=0.0, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS,
        clip_grad=CLIP, use_distributed_optimizer=True, bf16=False, fp16=False, params_dtype=torch.float32,
    )  # fmt: skip
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    _loss(ddp, mine).backward()
    finalize_model_grads([ddp])  # reduce-scatter of the grads over DP (averaged)
    ok, grad_norm, _ = optimizer.step()
    assert ok
    assert grad_norm > CLIP, "the step must actually clip"
    assert_close(torch.tensor(grad_norm), ref_norm)
    for name, param in model.named_parameters():
        assert_close(param.detach(), ref_params[name])
        assert not torch.equal(param.detach(), full[name]), f"{name} was not updated"


def test_ddp_distributed_optimizer_dp2_matches_one_process():
    run_world(_ddp_world, 2, timeout_s=120)
