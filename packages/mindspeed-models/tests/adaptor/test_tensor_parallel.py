"""megatron-core on CPU through the adaptor: GPTModel with TP=2 + sequence parallelism equals TP=1
(logits, loss, gradients gathered over TP), torch_dist checkpoints reshard between TP=2 and TP=1,
and megatron's RNG tracker runs on the CPU generator.

The reference is megatron's own TP=1 model, computed in the same processes; the TP=2 model gets
the reference's weights sliced by megatron's partition attributes.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import models_mcore_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)
import pytest
import torch

from mindspeed_kernels.testing import assert_close, run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]




def _forward(model, data, labels: bool):
    kwargs = {"labels": data["labels"]} if labels else {}
    return model(input_ids=data["input_ids"], position_ids=data["position_ids"], attention_mask=None, **kwargs)


def _reference(data):
    """TP=1: logits, mean loss, gradients and weights."""
    helpers.init_parallel(tensor_model_parallel_size=1)
    model = helpers.build_gpt(helpers.tiny_config())
    with torch.no_grad():
        logits = _forward(model, data, labels=False)
    loss = _forward(model, data, labels=True).mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits, loss.detach(), grads, helpers.full_state(model)


def _tp_sp_world(rank: int, ckpt_dir: str) -> None:
    from mindspeed_models.adaptor import install

    assert "megatron.core" not in sys.modules, "this world installs before megatron-core is imported"
    install("cpu")
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    data = helpers.batch(seed=7)
    ref_logits, ref_loss, ref_grads, full = _reference(data)

    helpers.init_parallel(tensor_model_parallel_size=2)
    config = helpers.tiny_config(tensor_model_parallel_size=2, sequence_parallel=True)
    model = helpers.build_gpt(config)
    helpers.load_full(model, full)
    ddp = helpers.wrap_ddp(config, model)
    tp_group = ps.get_tensor_model_parallel_group()
    with torch.no_grad():
        logits = helpers.gather_last(_forward(ddp, data, labels=False), tp_group)
    assert_close(logits, ref_logits)
    loss = _forward(ddp, data, labels=True).mean()
    assert_close(loss.detach(), ref_loss)
    loss.backward()
    finalize_model_grads([ddp])  # sums the sequence-parallel norm grads over TP
    tagged = [name for name, p in model.named_parameters() if getattr(p, "sequence_parallel", False)]
    assert tagged, "norm params must carry .sequence_parallel under SP"
    for name, param in model.named_parameters():
        grad = helpers.gather_tp(param, param.main_grad)
        assert_close(grad, ref_grads[name])
    _checkpoint_roundtrips(ckpt_dir, full, ref_logits)
    _check_rng_tracker()


def _check_rng_tracker() -> None:
    """megatron's CUDA RNG tracker on the CPU generator: the model-parallel stream is megatron's
    ``seed + 2718 + tp_rank`` (so it differs per TP rank), the default stream is ``seed``, and
    fork() restores the default stream."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    seed, records = 99, []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("megatron.core.tensor_parallel.random").addHandler(handler)
    helpers.init_parallel(seed=seed, tensor_model_parallel_size=2)
    tp_rank = ps.get_tensor_model_parallel_rank()
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        tp_draw = torch.rand(4)
    default_draw = torch.rand(4)
    assert torch.equal(tp_draw, torch.rand(4, generator=torch.Generator().manual_seed(seed + 2718 + tp_rank)))
    assert torch.equal(default_draw, torch.rand(4, generator=torch.Generator().manual_seed(seed)))
    torch.set_rng_state(before)
    assert torch.equal(torch.rand(4), default_draw), "fork() must leave the default stream where it was"
    draws = helpers.gather_last(tp_draw[None], ps.get_tensor_model_parallel_group(), dim=0)
    assert not torch.equal(draws[0], draws[1]), "TP ranks draw different model-parallel streams"
    assert not records, "the CPU-RNG-changed warning is expected on CPU and filtered"


def _checkpoint_roundtrips(ckpt_dir: str, full, ref_logits) -> None:
    """torch_dist save at TP=2 -> load at TP=1, and save at TP=1 -> load at TP=2: same logits."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    data = helpers.batch(seed=11)
    for save_tp, load_tp in ((2, 1), (1, 2)):
        path = Path(ckpt_dir) / f"tp{save_tp}"
        helpers.init_parallel(seed=1, tensor_model_parallel_size=save_tp)
        saved = helpers.build_gpt(helpers.tiny_config(tensor_model_parallel_size=save_tp))
        helpers.load_full(saved, full)
        with torch.no_grad():
            expected = helpers.gather_last(_forward(saved, data, labels=False), ps.get_tensor_model_parallel_group())
        if torch.distributed.get_rank() == 0:
            path.mkdir()
        torch.distributed.barrier()
        dist_checkpointing.save(saved.sharded_state_dict(), str(path))

        helpers.init_parallel(seed=2, tensor_model_parallel_size=load_tp)  # another seed: fresh weights differ
        loaded = helpers.build_gpt(helpers.tiny_config(tensor_model_parallel_size=load_tp))
        loaded.load_state_dict(dist_checkpointing.load(loaded.sharded_state_dict(), str(path)))
        with torch.no_grad():
            actual = helpers.gather_last(_forward(loaded, data, labels=False), ps.get_tensor_model_parallel_group())
        assert_close(actual, expected)


def test_gpt_tp2_sequence_parallel_matches_tp1_and_checkpoint_reshards(tmp_path):
    run_world(_tp_sp_world, 2, str(tmp_path), timeout_s=120)
