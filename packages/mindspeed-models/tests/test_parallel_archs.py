"""Every registered architecture under model parallelism equals the same model without it (gloo, 2 ranks).

(a) TP=2 + sequence parallelism == TP=1; for MoE architectures also EP=2 (megatron's and the kernels'
    token permutation) == EP=1 and TP=2 x EP=2
    (expert_tensor_parallel_size=1: experts whole, spread over the TP ranks) == TP=EP=1. Compared:
    logits [B, S, V], the mean LM loss and, after one backward pass through megatron's DDP and
    ``finalize_model_grads``, every parameter's gradient gathered to its full shape (routed
    experts re-indexed by EP rank to their global number).
(b) PP=2 with megatron's 1F1B schedule (``get_forward_backward_func``) == PP=1 (its no-pipelining
    schedule) on the same 4 microbatches: per-microbatch losses and every parameter's gradient,
    stages loaded by global layer number.

Reference: the unparallelised model in the same processes, built from the same tiny HF-style
config and loaded with the same random weights (norm weights near 1, random biases and a random
DeepSeek router expert bias: unit norms or zero biases would hide a sharding bug). MoE aux losses
stay on (their router gradients are part of the comparison). Every architecture in
``ARCHITECTURES`` must have a config in ``CONFIGS`` (checked without spawning), and each world
loops over all of them. deepseek_v3 carries one MTP layer (its loss and gradients are compared too);
deepseek_v2 uses softmax group-limited greedy routing. Runs through the CPU adaptor.
"""

from __future__ import annotations

import grid_model_checks as checks  # noqa: E402  (tests/conftest.py puts it on sys.path)
import models_mcore_helpers as helpers  # noqa: E402
import pytest
import torch
import torch.distributed as dist

from mindspeed_kernels.testing import assert_close, run_world
from mindspeed_models.architectures import ARCHITECTURES

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(600), pytest.mark.slow]

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
CONFIGS = {
    # head_dim 24 != hidden / heads = 16: attention sizes must come from kv_channels.
    "llama": dict(head_dim=24, attention_bias=True, mlp_bias=True),  # q/k/v/o and MLP biases
    "qwen2": dict(head_dim=24, tie_word_embeddings=True),  # qkv biases; tied embedding split over TP and PP stages
    "qwen3": dict(head_dim=24),  # per-head q/k norms
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48),  # softmax-over-all top-k
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),  # renormalised top-k
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                      mlp_only_layers=[0]),  # qkv biases; dense layer 0; sigmoid-gated shared expert
    "deepseek_v3": dict(num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                        n_shared_experts=1, first_k_dense_replace=1, moe_intermediate_size=32, routed_scaling_factor=1.5,
                        num_nextn_predict_layers=1),  # MLA; layer 0 dense, layer 1 MoE + shared expert; one MTP layer
    "deepseek_v2": dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, topk_method="group_limited_greedy",
                        n_group=4, topk_group=2, n_shared_experts=2, first_k_dense_replace=1, moe_intermediate_size=32,
                        routed_scaling_factor=2.0),  # MLA without q compression; softmax group-limited greedy
}  # fmt: skip
"""Tiny HF config.json contents per model_type (on top of SIZES)."""

SEQ, MICROBATCHES, MICRO_BATCH_SIZE = 32, 4, 4
# 4 x 32 tokens: with these weights (grid_model_checks.randomize seed 7) every routed expert of every MoE config gets
# tokens, so no reference gradient is zero (fewer tokens left some expert idle: nothing compared).


def _hf_config(model_type: str) -> dict:
    return {"model_type": model_type, **SIZES, "tie_word_embeddings": False, **CONFIGS[model_type]}


def _is_moe(model_type: str) -> bool:
    return ARCHITECTURES[model_type].layer_kind != "dense"


def _tokens(seed: int) -> torch.Tensor:
    """[MICRO_BATCH_SIZE, SEQ + 1] token ids: inputs are [:, :-1], labels [:, 1:]."""
    return torch.randint(0, SIZES["vocab_size"], (MICRO_BATCH_SIZE, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def test_every_architecture_has_a_config():
    """A newly registered architecture fails here until it gets a tiny config (the worlds loop over the registry)."""
    assert set(CONFIGS) == set(ARCHITECTURES), "add a tiny config to CONFIGS for every registered architecture"


# --- building and loading ---------------------------------------------------------------------


def _build(hf_config: dict, *, tp: int = 1, ep: int = 1, etp: int | None = None, pp: int = 1, **overrides):
    """Our model (this rank's stage of it) under a fresh parallel state; TP > 1 adds sequence parallelism.
    ``overrides``: more from_hf_config overrides (the MoE dispatcher, grouped GEMM)."""
    from megatron.core import parallel_state as ps

    import mindspeed_models as mm

    sizes = dict(tensor_model_parallel_size=tp, expert_model_parallel_size=ep, pipeline_model_parallel_size=pp)
    helpers.init_parallel(expert_tensor_parallel_size=etp, **sizes)
    overrides.update(sizes, sequence_parallel=tp > 1, pipeline_dtype=torch.float32)
    if etp is not None:
        overrides["expert_tensor_parallel_size"] = etp
    spec = mm.from_hf_config(hf_config, **overrides)
    return mm.build_model(spec, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())


def _load(model, full: dict[str, torch.Tensor]) -> None:
    """Copy the full weights into this rank's shard (TP/ETP slices, local experts, local layers)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(helpers.shard_strided(name, p, full[helpers.reference_name(model, name, full)]))
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):
                buf.copy_(full[helpers.global_name(model, name)])


def _assert_grads(model, grads: dict, ref_grads: dict, full: dict, what: str) -> None:
    """``grads`` (global name -> full-shape gradient on this rank) == ``ref_grads``; together the ranks
    cover every parameter of the full model."""
    for name, grad in grads.items():
        assert grad.shape == full[name].shape, name
        assert ref_grads[name].abs().sum() > 0, f"{what} {name}: zero reference gradient tests nothing"
        try:
            assert_close(grad, ref_grads[name])
        except AssertionError as err:  # assert_close does not say which parameter
            raise AssertionError(f"{what} {name}: gradient != reference\n{err}") from None
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, set(grads))
    params = {name for name in full if not name.endswith("expert_bias")}
    assert set().union(*everyone) == params, f"{what}: the ranks' gradients must cover every parameter"


# --- (a) TP / EP --------------------------------------------------------------------------------


def _step(model, tokens: torch.Tensor, full: dict):
    """Logits [B, S, V] (eval, no grad), then the mean LM loss of one forward/backward through megatron's
    DDP and the finalised gradients, gathered to full shape and keyed by global (TP=EP=1) name."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    import mindspeed_models as mm

    ids, labels = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        logits = mm.logits(model.eval(), ids)
    ddp = helpers.wrap_ddp(model.config, model.train())
    loss = ddp(ids, torch.arange(ids.shape[1]).expand_as(ids), None, labels=labels).mean()  # per-token losses [B, S]
    loss.backward()
    finalize_model_grads([ddp])
    grads = {
        helpers.reference_name(model, name, full): helpers.gather_strided(name, p, p.main_grad)
        for name, p in model.named_parameters()
    }
    return logits, loss.detach(), grads


def _check_against_reference(model_type: str, tokens: torch.Tensor, *variants: dict) -> None:
    """The model built with each of ``variants`` (_build kwargs) == at TP=EP=1, all fed ``tokens`` on this rank."""
    hf_config = _hf_config(model_type)
    # Each model runs right after it is built: megatron's collectives read the global parallel state.
    reference = _build(hf_config)
    full = checks.randomize(reference)
    ref_logits, ref_loss, ref_grads = _step(reference, tokens, full)
    for variant in variants:
        what = f"{model_type} {variant}"
        model = _build(hf_config, **variant)
        _load(model, full)
        logits, loss, grads = _step(model, tokens, full)
        assert logits.shape == ref_logits.shape == (MICRO_BATCH_SIZE, SEQ, SIZES["vocab_size"]), what
        try:
            assert_close(logits, ref_logits)
            assert_close(loss, ref_loss)
        except AssertionError as err:
            raise AssertionError(f"{what}: logits or loss != reference\n{err}") from None
        _assert_grads(model, grads, ref_grads, full, what)


def _tp_world(rank: int) -> None:
    from mindspeed_models.adaptor import install

    install("cpu")
    tokens = _tokens(5)  # the same on both ranks: TP ranks share their input
    for model_type in sorted(ARCHITECTURES):
        _check_against_reference(model_type, tokens, dict(tp=2))


def _ep_world(rank: int) -> None:
    from mindspeed_models.adaptor import install

    install("cpu")
    for model_type in sorted(t for t in ARCHITECTURES if _is_moe(t)):
        # EP=2: different tokens per rank (they cross ranks to their experts); DP=2 averages the gradients
        # of both, at EP=1 as at EP=2. Both token dispatchers, megatron's permutation and the kernels'
        # (moe_permute_fusion); grouped-GEMM experts (their backward too).
        ep2 = [dict(ep=2), dict(ep=2, moe_token_dispatcher_type="allgather"),
               dict(ep=2, moe_grouped_gemm=True, moe_permute_fusion=True),
               dict(ep=2, moe_token_dispatcher_type="allgather", moe_permute_fusion=True)]  # fmt: skip
        _check_against_reference(model_type, _tokens(5 + rank), *ep2)
        _check_against_reference(model_type, _tokens(5), dict(tp=2, ep=2, etp=1))


def test_tensor_parallel_2_equals_1_every_architecture():
    run_world(_tp_world, 2, timeout_s=300)


def test_expert_parallel_2_and_tp2_x_ep2_equal_1_every_moe_architecture():
    run_world(_ep_world, 2, timeout_s=300)


# --- (b) PP ---------------------------------------------------------------------------------------


def _pp_check(model_type: str, micro: list[dict[str, torch.Tensor]]) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    hf_config = _hf_config(model_type)
    reference = _build(hf_config)
    full = checks.randomize(reference)
    ref_losses = helpers.run_schedule([reference], micro)
    ref_grads = {name: p.grad.clone() for name, p in reference.named_parameters()}

    stage = _build(hf_config, pp=2)
    _load(stage, full)
    wrapped = helpers.wrap_ddp(stage.config, stage)
    losses = helpers.run_schedule([wrapped], micro)
    finalize_model_grads([wrapped])  # also sums a tied embedding's gradients over the first and last stage
    if ps.is_pipeline_last_stage():
        assert len(losses) == MICROBATCHES, model_type
        try:
            assert_close(torch.stack(losses), torch.stack(ref_losses))
        except AssertionError as err:
            raise AssertionError(f"{model_type} PP=2: microbatch losses != PP=1\n{err}") from None
    grads = {helpers.reference_name(stage, name, full): p.main_grad for name, p in stage.named_parameters()}
    _assert_grads(stage, grads, ref_grads, full, f"{model_type} PP=2")


def _pp_world(rank: int) -> None:
    from mindspeed_models.adaptor import install

    install("cpu")
    micro = []
    for i in range(MICROBATCHES):
        tokens = _tokens(11 + i)
        positions = torch.arange(SEQ).expand(MICRO_BATCH_SIZE, SEQ)
        micro.append({"input_ids": tokens[:, :-1], "position_ids": positions, "labels": tokens[:, 1:]})
    for model_type in sorted(ARCHITECTURES):
        _pp_check(model_type, micro)


def test_pipeline_parallel_2_1f1b_equals_1_every_architecture():
    run_world(_pp_world, 2, timeout_s=300)
