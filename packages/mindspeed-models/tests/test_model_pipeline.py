"""Our models under pipeline parallelism: megatron's own schedules (get_forward_backward_func) at
PP=2 give the per-microbatch LM losses and the gradients of the PP=1 model on the same weights.

1F1B: Qwen2 (2 layers, tied embeddings: the output layer on the last stage shares the first
stage's word embeddings, and megatron's finalize_model_grads sums their gradients). Interleaved
(VPP=2): Qwen3 (4 layers, untied; q/k norms), two model chunks per rank. Reference: the PP=1
model built from the same HF config, run by megatron's no-pipelining schedule over the same 4
microbatches. Each stage's parameters are copied from the PP=1 model by global layer index
(megatron's layer_number). Runs through the CPU adaptor.
"""

from __future__ import annotations

import models_mcore_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)
import pytest
import torch

from mindspeed_kernels.testing import assert_close, run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]

MICROBATCHES, MICRO_BATCH_SIZE, SEQ = 4, 2, 8
CONFIG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=32)  # fmt: skip


def _microbatches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(MICROBATCHES):
        tokens = torch.randint(0, CONFIG["vocab_size"], (MICRO_BATCH_SIZE, SEQ + 1), generator=gen)
        positions = torch.arange(SEQ).expand(MICRO_BATCH_SIZE, SEQ)
        out.append({"input_ids": tokens[:, :-1], "position_ids": positions, "labels": tokens[:, 1:]})
    return out


def _build(hf_config: dict, pp: int, vpp: int | None, vp_stage: int | None):
    """Our model chunk ``vp_stage`` of this rank's stage (the whole model at pp=1)."""
    from megatron.core import parallel_state as ps

    import mindspeed_models as mm

    spec = mm.from_hf_config(hf_config, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                             pipeline_dtype=torch.float32)  # fmt: skip
    pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return mm.build_model(spec, pre_process=pre, post_process=post, vp_stage=vp_stage)


def _reference(hf_config: dict, micro):
    """PP=1: the model's parameters, the per-microbatch losses and the gradients."""
    helpers.init_parallel()
    torch.manual_seed(0)
    model = _build(hf_config, 1, None, None)
    losses = helpers.run_schedule([model], micro)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return helpers.full_state(model), losses, grads


def _check(hf_config: dict, micro, vpp: int | None) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    full, ref_losses, ref_grads = _reference(hf_config, micro)
    helpers.init_parallel(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=vpp)
    chunks = [_build(hf_config, 2, vpp, v) for v in ([None] if vpp is None else range(vpp))]
    for chunk in chunks:
        helpers.load_full(chunk, full)
    wrapped = [helpers.wrap_ddp(chunk.config, chunk) for chunk in chunks]
    losses = helpers.run_schedule(wrapped, micro)
    finalize_model_grads(wrapped)  # sums the tied embedding's gradients over the first and last stage

    if ps.is_pipeline_last_stage():
        assert len(losses) == MICROBATCHES
        assert_close(torch.stack(losses), torch.stack(ref_losses))
    seen = set()
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            ref_name = helpers.reference_name(chunk, name, full)
            assert ref_grads[ref_name].abs().sum() > 0, f"{ref_name}: zero reference gradient tests nothing"
            try:
                assert_close(param.main_grad, ref_grads[ref_name])
            except AssertionError as err:  # assert_close does not say which parameter
                raise AssertionError(f"{hf_config['model_type']} {name} ({ref_name}): PP=2 gradient != PP=1\n{err}") from None
            seen.add(ref_name)
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, seen)
    assert set().union(*everyone) == set(full), "every reference parameter lives on some stage"


def _pipeline_world(rank: int) -> None:
    from mindspeed_models.adaptor import install

    install("cpu")
    micro = _microbatches()
    qwen2 = {"model_type": "qwen2", **CONFIG, "num_hidden_layers": 2, "tie_word_embeddings": True}
    qwen3 = {"model_type": "qwen3", **CONFIG, "num_hidden_layers": 4, "head_dim": 16, "tie_word_embeddings": False}
    _check(qwen2, micro, vpp=None)  # 1F1B
    _check(qwen3, micro, vpp=2)  # interleaved


def test_pp2_1f1b_and_interleaved_match_pp1():
    run_world(_pipeline_world, 2, timeout_s=180)
