"""What the grid-layer model tests (test_tp2d.py, test_ndmm.py) share: a model built at TP=1
and its grid version in the same processes, weights loaded block by block, and logits, loss,
every gradient and the torch_dist keys compared (reference: megatron-core's own GPTModel with
our plain specs)."""

from __future__ import annotations

from collections.abc import Callable

import models_mcore_helpers as helpers
import torch

from mindspeed_kernels.testing import assert_close

SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
CONFIGS = {
    "llama": dict(attention_bias=True, mlp_bias=True),
    "qwen2": dict(),
    "qwen3": dict(head_dim=8),
}
SEQ, BATCH = 16, 2


def hf_config(model_type: str, **overrides) -> dict:
    return {"model_type": model_type, **SIZES, **CONFIGS[model_type], **overrides}


def build(hf: dict, tp: int, enable: Callable | None = None, seed: int = 1234):
    """megatron's GPT model of ``hf`` at TP size ``tp``; ``enable(spec) -> spec`` turns the spec into
    its grid version (called once the process groups exist)."""
    import mindspeed_models as mm

    helpers.init_parallel(seed, tensor_model_parallel_size=tp)
    torch.manual_seed(seed)
    spec = mm.from_hf_config(hf, tensor_model_parallel_size=tp, pipeline_dtype=torch.float32)
    return mm.build_model(enable(spec) if enable is not None else spec)


def vocab_block(module, full: torch.Tensor) -> torch.Tensor | None:
    """This rank's block of an embedding / output-layer tensor (megatron's vocabulary split), else None."""
    from megatron.core import parallel_state as ps

    if "embedding" in type(module).__name__.lower() or "output_layer" in getattr(module, "_grid_test_name", ""):
        rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        return full.reshape(size, -1, *full.shape[1:])[rank]
    return None


def check_against_tp1(hf: dict, tp: int, enable: Callable, block: Callable, what: str) -> None:
    """The grid model (``enable`` applied at TP ``tp``) equals the TP=1 model: host-side initial
    weights are blocks of the reference's (``block(module, pname, full)`` = this rank's block of the
    full tensor), and with random weights loaded block by block, logits, loss and every gradient
    (through megatron's DDP and ``finalize_model_grads``) agree; torch_dist keys and global shapes match."""
    tokens = torch.randint(0, hf["vocab_size"], (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    reference = build(hf, 1)
    initial = {name: p.detach().clone() for name, p in reference.named_parameters()}
    model = build(hf, tp, enable)
    for name, module, pname, p in params(model):  # host-side initialisation is layout-independent
        assert torch.equal(p.detach(), block(module, pname, initial[name])), f"{what}: initial {name} differs"
    reference = build(hf, 1)
    full = randomize(reference)
    ref_logits, ref_loss = step(reference, tokens)
    ref_grads = {name: p.main_grad.detach().clone() for name, p in reference.named_parameters()}
    model = build(hf, tp, enable)
    with torch.no_grad():
        for name, module, pname, p in params(model):
            p.copy_(block(module, pname, full[name]))
    logits, loss = step(model, tokens)
    assert_close(logits, ref_logits)
    assert_close(loss, ref_loss)
    for name, module, pname, p in params(model):
        assert ref_grads[name].abs().sum() > 0, f"{what}: zero reference gradient for {name}"
        try:
            assert_close(p.main_grad, block(module, pname, ref_grads[name]))
        except AssertionError as err:
            raise AssertionError(f"{what}: gradient of {name} != reference\n{err}") from None
    check_sharded_keys(model, reference, what)


def params(model):
    """(name, owning module, parameter name, parameter) of every parameter."""
    for mname, module in model.named_modules():
        module._grid_test_name = mname
        for pname, p in module.named_parameters(recurse=False):
            yield f"{mname}.{pname}" if mname else pname, module, pname, p


def randomize(model, seed: int = 7) -> dict[str, torch.Tensor]:
    """Random weights in a full (unparallelised) model (norms near 1); returns them, with the router
    expert biases (buffers) of MoE models."""
    gen = torch.Generator().manual_seed(seed)
    full = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if p.dim() == 1 and "norm" in name else (0.1 if p.dim() == 1 else 0.08) * noise)
            full[name] = p.detach().clone()
        for name, buf in model.named_buffers():
            if name.endswith("expert_bias"):  # DeepSeek's selection-only bias: big enough to change choices
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
                full[name] = buf.detach().clone()
    return full


def step(model, tokens: torch.Tensor):
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    import mindspeed_models as mm

    ids, labels = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        logits = mm.logits(model.eval(), ids)
    ddp = helpers.wrap_ddp(model.config, model.train())
    loss = ddp(ids, torch.arange(ids.shape[1]).expand_as(ids), None, labels=labels).mean()
    loss.backward()
    finalize_model_grads([ddp])
    return logits, loss.detach()


def check_sharded_keys(model, reference, what: str) -> None:
    """The grid model's torch_dist entries are the plain model's keys with the same global shapes."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def shapes(m) -> dict:
        out = {}
        for value in m.sharded_state_dict().values():
            if isinstance(value, ShardedTensorFactory):
                value = value.build()[0]
            if isinstance(value, ShardedTensor):
                out[value.key] = value.global_shape
        return out

    # the reference built at TP=1 describes the same global tensors
    got, want = shapes(model), shapes(reference)
    assert got == want, f"{what}: sharded keys/shapes differ: {set(got.items()) ^ set(want.items())}"


def setup() -> None:
    from mindspeed_models.adaptor import install

    install("cpu")
    torch.set_num_threads(1)
