"""Our layer spec under tensor parallelism: TP=2 (+ sequence parallelism) equals TP=1 on the same weights.

Forward: logits. Backward: the LM loss and, after one backward pass and megatron's gradient
finalisation (``finalize_model_grads``: the all-reduce of sequence-parallel norm and q/k-norm
gradients over TP ranks), every parameter's gradient gathered along its partition dim.
Covers what TP splits in our modules: GQA heads per rank (FlashAttention reads them from the
shapes), replicated per-head q/k norms (Qwen3), column-parallel q/k/v biases (Qwen2), the
[gate | up] fc1 layout (partition stride 2) feeding SwiGLU, and the vocab-parallel embedding and
cross entropy (tied in Qwen2). Reference: the TP=1 model in the same processes. Runs through the
CPU adaptor (megatron's TP collectives allocate on the device).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mindspeed_kernels.testing import assert_close, run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, head_dim=24)  # fmt: skip
MODEL_TYPES = ("qwen2", "qwen3")  # llama's layer is qwen2's without the biases: nothing TP-specific to add


def _hf_config(model_type: str) -> dict:
    # head_dim 24 != hidden / heads = 16: the attention sizes come from kv_channels, not hidden_size.
    return {"model_type": model_type, **CONFIG, "tie_word_embeddings": model_type == "qwen2"}


def _shard(param, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's slice: megatron splits each of the ``partition_stride`` blocks (fc1's gate and up) separately."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    return torch.cat([block.chunk(size, dim)[rank] for block in full.chunk(stride, dim)], dim)


def _gather(param, local: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_shard``: all-gather the TP slices of ``local`` and reassemble the full tensor."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return local
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    blocks = [part.chunk(stride, dim) for part in parts]
    return torch.cat([torch.cat([b[i] for b in blocks], dim) for i in range(stride)], dim)


def _build(tp: int, hf_config: dict, full: dict | None):
    """Our model at TP=``tp`` (+SP when tp > 1); weights from ``full`` (TP=1 tensors) when given."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    import mindspeed_models as mm

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(0)
    spec = mm.from_hf_config(hf_config, tensor_model_parallel_size=tp, sequence_parallel=tp > 1)
    model = mm.build_model(spec)
    if full is None:
        full = {name: p.detach().clone() for name, p in model.named_parameters()}
    else:
        rank = ps.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(_shard(p, full[name], rank, tp))
    return model, full


def _loss_and_grads(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean LM loss of one forward/backward through megatron's DDP wrapper, and every parameter's
    finalised (TP-reduced) gradient, gathered to its full TP=1 shape."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=False), model)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    loss = ddp(ids, positions, None, labels=labels).mean()  # per-token losses [B, S] from vocab-parallel CE
    loss.backward()
    finalize_model_grads([ddp])
    grads = {name: _gather(p, p.main_grad) for name, p in model.named_parameters()}
    return loss.detach(), grads


def _run(model, ids: torch.Tensor, labels: torch.Tensor):
    """Logits [B, S, V] (no grad), then the loss and finalised gradients of one training step."""
    import mindspeed_models as mm

    with torch.no_grad():
        logits = mm.logits(model.eval(), ids)
    return (logits, *_loss_and_grads(model.train(), ids, labels))


def _tp_world(rank: int) -> None:
    from mindspeed_models.adaptor import install

    install("cpu")
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 9), generator=gen)
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    for model_type in MODEL_TYPES:
        hf_config = _hf_config(model_type)
        # Each model runs right after it is built: megatron's collectives (the vocab-parallel
        # cross entropy's all-reduce) read the current global parallel state.
        reference, full = _build(1, hf_config, None)
        ref_logits, ref_loss, ref_grads = _run(reference, ids, labels)
        sharded, _ = _build(2, hf_config, full)
        tp_logits, tp_loss, tp_grads = _run(sharded, ids, labels)
        assert tp_logits.shape == ref_logits.shape == (2, 8, CONFIG["vocab_size"])
        assert_close(tp_logits, ref_logits)
        assert_close(tp_loss, ref_loss)
        assert tp_grads.keys() == ref_grads.keys() == full.keys()
        for name, grad in tp_grads.items():
            assert grad.shape == full[name].shape, name
            assert ref_grads[name].abs().sum() > 0, f"{model_type} {name}: zero reference gradient tests nothing"
            try:
                assert_close(grad, ref_grads[name])
            except AssertionError as err:  # assert_close does not say which parameter
                raise AssertionError(f"{model_type} {name}: TP=2 gradient != TP=1\n{err}") from None


def test_tensor_parallel_two_equals_one_forward_and_backward():
    run_world(_tp_world, 2, timeout_s=180)
