"""``cross_entropy_loss_fusion=True``: the per-token losses and every parameter gradient of a forward with
labels equal megatron's unfused path (output layer -> logits -> ``vocab_parallel_cross_entropy``).

Reference: the same model built without the flag in the same process, loaded with the same weights
(copied parameter by parameter, so both see identical shards), fed the same batch and the same
non-uniform upstream gradient of the per-token loss. Compared within mindspeed_kernels' TOLERANCES:
qwen2 untied and tied (fp32 and bf16) and deepseek_v3 with one MTP layer (its loss reaches the
gradients through megatron's MTPLossAutoScaler) at TP=1; at TP=2 with and without sequence
parallelism and at PP=2 on 2 gloo ranks. Logits (no labels) stay megatron's.
"""

from __future__ import annotations

import pytest
import torch

from mindspeed_kernels.testing import assert_close, assert_error_within, run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]

SIZES = dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
QWEN2 = dict(model_type="qwen2", **SIZES, tie_word_embeddings=False)
DEEPSEEK_V3 = dict(model_type="deepseek_v3", **{**SIZES, "num_key_value_heads": 4}, tie_word_embeddings=False,
                   q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                   n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                   first_k_dense_replace=1, moe_intermediate_size=32, routed_scaling_factor=1.5,
                   num_nextn_predict_layers=1)  # MLA, layer 1 MoE + shared expert, one MTP layer  # fmt: skip
BATCH, SEQ = 2, 16
CHUNK = 7  # tokens per logits chunk: several uneven chunks per call, as with a real vocabulary


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    from mindspeed_models import fused_loss

    monkeypatch.setattr(fused_loss, "MAX_CHUNK_TOKENS", CHUNK)


def _build(hf_config: dict, fusion: bool, **overrides):
    """This rank's stage of our model under the current parallel state, with or without the fused loss."""
    from megatron.core import parallel_state as ps

    import mindspeed_models as mm
    from mindspeed_models import runtime

    runtime.ensure_parallel_state()  # a one-process test: world size 1; the worlds set theirs up first
    overrides.setdefault("pipeline_dtype", overrides.get("params_dtype", torch.float32))
    spec = mm.from_hf_config(hf_config, cross_entropy_loss_fusion=fusion, **overrides)
    return mm.build_model(spec, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())


def _pair(hf_config: dict, **overrides):
    """(unfused, fused) models with identical parameters (random, non-trivial norms) and router biases."""
    unfused, fused = _build(hf_config, False, **overrides), _build(hf_config, True, **overrides)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for (name, p), q in zip(unfused.named_parameters(), fused.parameters(), strict=True):
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if p.dim() == 1 and "norm" in name else 0.08 * noise)
            q.copy_(p)
        for (name, b), c in zip(unfused.named_buffers(), fused.buffers(), strict=True):
            if name.endswith("expert_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
                c.copy_(b)
    return unfused, fused


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, SIZES["vocab_size"], (BATCH, SEQ + 1), generator=gen)
    upstream = torch.rand(BATCH, SEQ, generator=gen)  # a different gradient for every token's loss
    loss_mask = (torch.rand(BATCH, SEQ, generator=gen) > 0.2).float()
    return tokens[:, :-1], tokens[:, 1:], upstream, loss_mask


def _step(model, ids, labels, upstream, loss_mask):
    """Per-token loss [B, S] and each parameter's gradient after backward of ``sum(upstream * loss)``."""
    model.train()
    model.zero_grad(set_to_none=True)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    loss = model(ids, positions, None, labels=labels, loss_mask=loss_mask)
    (upstream * loss).sum().backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def _compare(hf_config: dict, what: str, **overrides) -> None:
    unfused, fused = _pair(hf_config, **overrides)
    batch = _batch()
    ref_loss, ref_grads = _step(unfused, *batch)
    loss, grads = _step(fused, *batch)
    assert loss.dtype == ref_loss.dtype == torch.float32 and loss.shape == (BATCH, SEQ), what
    try:
        assert_close(loss, ref_loss)
    except AssertionError as err:
        raise AssertionError(f"{what}: per-token loss != megatron's\n{err}") from None
    assert set(grads) == set(ref_grads), what
    for name, ref in ref_grads.items():
        assert ref is not None and grads[name] is not None, f"{what} {name}: no gradient"
        # a routed expert may get no token of this tiny batch; everything else must have a gradient to compare
        assert ref.abs().sum() > 0 or ".local_experts." in name, f"{what} {name}: zero reference gradient tests nothing"
        try:
            assert_close(grads[name], ref)
        except AssertionError as err:
            raise AssertionError(f"{what} {name}: gradient != megatron's\n{err}") from None


# --- one process ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen2_loss_and_gradients_match_megatron(tied):
    _compare({**QWEN2, "tie_word_embeddings": tied}, f"qwen2 tied={tied}")


def test_qwen2_bf16_loss_and_gradients_match_megatron():
    """bf16: the per-token loss within TOLERANCES[bf16] of megatron's bf16 path. The kernel forms the logits
    in float32 where megatron rounds them to bf16 first, so the gradients are checked against the float32
    model with the same (bf16-representable) weights: each error at most twice megatron bf16's own."""
    unfused, fused = _pair(QWEN2, params_dtype=torch.bfloat16, bf16=True)
    exact = _build(QWEN2, False)
    with torch.no_grad():
        for p, e in zip(unfused.parameters(), exact.parameters(), strict=True):
            e.copy_(p)
    batch = _batch()
    (low_loss, low_grads), (loss, grads) = _step(unfused, *batch), _step(fused, *batch)
    exact_loss, exact_grads = _step(exact, *batch)
    assert loss.dtype == torch.float32
    assert_close(loss, low_loss, torch.bfloat16)
    assert_error_within(loss, low_loss, exact_loss)
    for name, ref in exact_grads.items():
        try:
            assert_error_within(grads[name], low_grads[name], ref)
        except AssertionError as err:
            raise AssertionError(f"qwen2 bf16 {name}: gradient error vs float32 > 2 x megatron bf16's\n{err}") from None


def test_deepseek_v3_mtp_loss_and_gradients_match_megatron():
    """The MTP depth's loss goes through the kernel too: its gradients (MTP layer, shared head) must match."""
    _compare(DEEPSEEK_V3, "deepseek_v3 + MTP")


def test_logits_without_labels_are_unchanged():
    import mindspeed_models as mm

    unfused, fused = _pair(QWEN2)
    ids = _batch()[0]
    with torch.no_grad():
        torch.testing.assert_close(mm.logits(fused.eval(), ids), mm.logits(unfused.eval(), ids), rtol=0, atol=0)


def test_fused_model_never_calls_the_output_layer_with_labels():
    """The point of the fusion: no [s, b, V] logits (the output layer does not run) when labels are given."""
    _, fused = _pair(QWEN2)
    calls = []
    fused.output_layer.register_forward_hook(lambda *args: calls.append(1))
    ids, labels, _, _ = _batch()
    fused(ids, torch.arange(SEQ).expand_as(ids), None, labels=labels)
    assert calls == []


def test_te_impl_without_transformer_engine_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("TransformerEngine is installed: megatron's 'te' path is usable")
    import mindspeed_models as mm

    spec = mm.from_hf_config(QWEN2, cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te")
    with pytest.raises(ValueError, match="cross_entropy_fusion_impl='te'"):
        mm.build_model(spec)


# --- two gloo ranks ------------------------------------------------------------------------------


def _parallel_world(rank: int) -> None:
    import models_mcore_helpers as helpers

    from mindspeed_models import fused_loss
    from mindspeed_models.adaptor import install

    install("cpu")
    fused_loss.MAX_CHUNK_TOKENS = CHUNK
    for sp in (True, False):
        helpers.init_parallel(tensor_model_parallel_size=2)
        # megatron refuses to train MoE under TP without sequence parallelism
        for hf_config in (QWEN2, {**QWEN2, "tie_word_embeddings": True}, *([DEEPSEEK_V3] if sp else [])):
            what = f"{hf_config['model_type']} tied={hf_config['tie_word_embeddings']} TP=2 SP={sp}"
            _compare(hf_config, what, tensor_model_parallel_size=2, sequence_parallel=sp)
    helpers.init_parallel(pipeline_model_parallel_size=2)
    for tied in (False, True):
        _compare_pp(helpers, {**QWEN2, "tie_word_embeddings": tied}, f"qwen2 tied={tied} PP=2")


def _compare_pp(helpers, hf_config: dict, what: str) -> None:
    """PP=2 through megatron's 1F1B schedule (4 microbatches): the loss is computed on the last stage only;
    each stage's gradients (a tied embedding's copy on the last stage included) match megatron's."""
    unfused, fused = _pair(hf_config, pipeline_model_parallel_size=2)
    micro = []
    for seed in range(4):
        ids, labels, _, _ = _batch(seed)
        micro.append(dict(input_ids=ids, position_ids=torch.arange(SEQ).expand_as(ids), labels=labels))
    results = []
    for model in (unfused, fused):
        model.train()
        losses = helpers.run_schedule([model], micro)
        results.append((losses, {name: p.grad for name, p in model.named_parameters()}))
    (ref_losses, ref_grads), (losses, grads) = results
    assert len(losses) == len(ref_losses), what
    for loss, ref in zip(losses, ref_losses, strict=True):
        assert_close(loss, ref)
    for name, ref in ref_grads.items():
        try:
            assert_close(grads[name], ref)
        except AssertionError as err:
            raise AssertionError(f"{what} {name}: gradient != megatron's\n{err}") from None


def test_tp2_and_pp2_match_megatron():
    run_world(_parallel_world, 2, timeout_s=240)


def test_chunk_tokens_follow_the_logits_budget(monkeypatch):
    from mindspeed_models import fused_loss

    monkeypatch.setattr(fused_loss, "MAX_CHUNK_TOKENS", 4096)  # the shipped cap, not the tests' CHUNK
    assert fused_loss.chunk_tokens(32000) == 1048  # 128 MiB of float32 logits
    assert fused_loss.chunk_tokens(152064) == 220
    assert fused_loss.chunk_tokens(16) == 4096
    assert fused_loss.chunk_tokens(10**9) == 1
