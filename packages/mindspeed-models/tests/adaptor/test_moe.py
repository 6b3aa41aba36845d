"""megatron-core MoE on CPU through the adaptor: a GPTModel with 4 experts, top-2 routing and the
allgather and alltoall token dispatchers at EP=2 gives the logits, loss and gradients of megatron's
own EP=1 model. Each rank feeds its own batch, so tokens really cross ranks."""

from __future__ import annotations

import models_mcore_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)
import pytest
import torch
import torch.distributed as dist

from mindspeed_kernels.testing import assert_close, run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]




def _moe_config(dispatcher: str, ep: int):
    return helpers.tiny_config(
        num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_token_dispatcher_type=dispatcher,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, expert_model_parallel_size=ep,
    )  # fmt: skip


def _run(model, data):
    """(logits, mean loss, {name: grad}) of one forward/backward."""
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], position_ids=data["position_ids"], attention_mask=None)
    loss = model(**data, attention_mask=None).mean()
    loss.backward()
    return logits, loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _moe_world(rank: int) -> None:
    from mindspeed_models.adaptor import install

    install("cpu")
    data = helpers.batch(seed=40 + rank)  # different tokens per rank

    helpers.init_parallel()
    ref = helpers.build_gpt(_moe_config("allgather", ep=1), num_experts=4)
    ref_logits, ref_loss, ref_grads = _run(ref, data)
    full = helpers.full_state(ref)
    for name, grad in ref_grads.items():
        if ".experts." in name:  # an expert sees the tokens of every EP rank: its grad sums their losses'
            dist.all_reduce(grad)

    for dispatcher in ("allgather", "alltoall"):
        helpers.init_parallel(expert_model_parallel_size=2)
        model = helpers.build_gpt(_moe_config(dispatcher, ep=2), num_experts=4)
        helpers.load_full(model, full)
        logits, loss, grads = _run(model, data)
        assert_close(logits, ref_logits)
        assert_close(loss, ref_loss)
        local_experts = [name for name in grads if ".experts." in name]
        assert len(local_experts) == len([n for n in full if ".experts." in n]) // 2, "EP=2 holds half the experts"
        for name, grad in grads.items():
            assert_close(grad, ref_grads[helpers.global_name(model, name)])


def test_moe_allgather_and_alltoall_ep2_match_ep1():
    run_world(_moe_world, 2, timeout_s=120)
