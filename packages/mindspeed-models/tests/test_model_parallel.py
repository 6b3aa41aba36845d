"""Our layer spec under tensor parallelism: TP=2 (+ sequence parallelism) logits equal TP=1 on the same weights.

Covers what TP splits in our modules: GQA heads per rank (FlashAttention reads them from the
shapes), replicated per-head q/k norms (Qwen3), column-parallel q/k/v biases (Qwen2) and the
[gate | up] fc1 layout (partition stride 2) feeding SwiGLU. Reference: the TP=1 model in the
same processes. Runs through the CPU adaptor (megatron's TP collectives allocate on the device).
"""

from __future__ import annotations

import pytest
import torch

from mindspeed_kernels.testing import assert_close, run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, head_dim=24)  # fmt: skip


def _shard(param, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's slice: megatron splits each of the ``partition_stride`` blocks (fc1's gate and up) separately."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    return torch.cat([block.chunk(size, dim)[rank] for block in full.chunk(stride, dim)], dim)


def _logits_at(tp: int, hf_config: dict, full: dict | None, ids: torch.Tensor):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    import mindspeed_models as mm

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(0)
    spec = mm.from_hf_config(hf_config, tensor_model_parallel_size=tp, sequence_parallel=tp > 1)
    model = mm.build_model(spec).eval()
    if full is None:
        full = {name: p.detach().clone() for name, p in model.named_parameters()}
    else:
        rank = ps.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(_shard(p, full[name], rank, tp))
    with torch.no_grad():
        return mm.logits(model, ids), full


def _tp_world(rank: int) -> None:
    from mindspeed_models.adaptor import install

    install("cpu")
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(5))
    for model_type in ("qwen2", "qwen3"):
        hf_config = {"model_type": model_type, **CONFIG, "tie_word_embeddings": model_type == "qwen2"}
        reference, full = _logits_at(1, hf_config, None, ids)
        sharded, _ = _logits_at(2, hf_config, full, ids)
        assert sharded.shape == reference.shape == (2, 8, CONFIG["vocab_size"])
        assert_close(sharded, reference)


def test_tensor_parallel_two_equals_one():
    run_world(_tp_world, 2, timeout_s=120)
