"""TP-2D models (mindspeed_models.tp2d) equal the unparallelised model (gloo, worlds 2 and 4).

For tiny llama (q/k/v/o and MLP biases), qwen2 (qkv biases, GQA) and qwen3 (per-head q/k norms)
configs, on grids 2x2 (world 4), 1x2 and 2x1 (world 2):

- host-side initialisation: with the same seed, every TP-2D parameter is exactly this rank's block
  of the TP=1 model's parameter (so both start from the same function);
- with random weights (norms near 1, random biases) loaded from the TP=1 model: logits [B, S, V],
  the mean LM loss and, after one backward through megatron's DDP and ``finalize_model_grads``,
  every gradient (this rank's block of the reference gradient) equal the TP=1 model's;
- the torch_dist sharded state dict has megatron's keys and global shapes.

Reference: megatron-core's own GPTModel with our plain specs in the same processes.
"""

from __future__ import annotations

import models_mcore_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)
import pytest
import torch

from mindspeed_kernels.testing import assert_close, run_world

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]

SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
CONFIGS = {
    "llama": dict(attention_bias=True, mlp_bias=True),
    "qwen2": dict(),
    "qwen3": dict(head_dim=8),
}
SEQ, BATCH = 16, 2


def _hf(model_type: str) -> dict:
    return {"model_type": model_type, **SIZES, **CONFIGS[model_type]}


def _build(hf: dict, grid: tuple[int, int] | None, seed: int = 1234):
    from megatron.core import parallel_state as ps

    import mindspeed_models as mm
    from mindspeed_models.tp2d import enable_tp2d, make_settings

    tp = 1 if grid is None else grid[0] * grid[1]
    helpers.init_parallel(seed, tensor_model_parallel_size=tp)
    torch.manual_seed(seed)
    spec = mm.from_hf_config(hf, tensor_model_parallel_size=tp, pipeline_dtype=torch.float32)
    if grid is not None:
        spec = enable_tp2d(spec, make_settings(ps.get_tensor_model_parallel_group(), *grid))
    return mm.build_model(spec)


def _block(module, pname: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's block of the full (TP=1) tensor ``full`` for parameter ``pname`` of ``module``."""
    from megatron.core import parallel_state as ps

    from mindspeed_models.tp2d import Linear2D, Norm2D

    if isinstance(module, Linear2D):
        rows = torch.cat(full.split(module.out_features // (module.ag_size * module.stride))[module.a :: module.ag_size])
        if pname == "bias":
            return rows
        cols = module.in_features // module.rs_size
        return rows[:, module.r * cols : (module.r + 1) * cols]
    if isinstance(module, Norm2D):
        return full.reshape(module.tp_y, -1)[module.y]
    if "embedding" in type(module).__name__.lower() or "output_layer" in getattr(module, "_tp2d_test_name", ""):
        rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        return full.reshape(size, -1, *full.shape[1:])[rank]
    return full


def _params(model):
    """(name, owning module, parameter name, parameter) of every parameter."""
    for mname, module in model.named_modules():
        module._tp2d_test_name = mname
        for pname, p in module.named_parameters(recurse=False):
            yield f"{mname}.{pname}" if mname else pname, module, pname, p


def _randomize(model, seed: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    full = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if p.dim() == 1 and "norm" in name else (0.1 if p.dim() == 1 else 0.08) * noise)
            full[name] = p.detach().clone()
    return full


def _step(model, tokens: torch.Tensor):
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


def _check(model_type: str, grid: tuple[int, int]) -> None:
    hf, what = _hf(model_type), f"{model_type} {grid[0]}x{grid[1]}"
    tokens = torch.randint(0, SIZES["vocab_size"], (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    reference = _build(hf, None)
    initial = {name: p.detach().clone() for name, p in reference.named_parameters()}
    model = _build(hf, grid)
    for name, module, pname, p in _params(model):  # host-side initialisation is layout-independent
        assert torch.equal(p.detach(), _block(module, pname, initial[name])), f"{what}: initial {name} differs"
    reference = _build(hf, None)
    full = _randomize(reference)
    ref_logits, ref_loss = _step(reference, tokens)
    ref_grads = {name: p.main_grad.detach().clone() for name, p in reference.named_parameters()}
    model = _build(hf, grid)
    with torch.no_grad():
        for name, module, pname, p in _params(model):
            p.copy_(_block(module, pname, full[name]))
    logits, loss = _step(model, tokens)
    assert_close(logits, ref_logits)
    assert_close(loss, ref_loss)
    for name, module, pname, p in _params(model):
        assert ref_grads[name].abs().sum() > 0, f"{what}: zero reference gradient for {name}"
        try:
            assert_close(p.main_grad, _block(module, pname, ref_grads[name]))
        except AssertionError as err:
            raise AssertionError(f"{what}: gradient of {name} != reference\n{err}") from None
    _check_sharded_keys(model, reference, what)


def _check_sharded_keys(model, reference, what: str) -> None:
    """The TP-2D model's torch_dist entries are the plain model's keys with the same global shapes."""
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


def _setup() -> None:
    from mindspeed_models.adaptor import install

    install("cpu")
    torch.set_num_threads(1)


def _world4(rank: int) -> None:
    _setup()
    for model_type in CONFIGS:
        _check(model_type, (2, 2))


def _world2(rank: int) -> None:
    _setup()
    for model_type in CONFIGS:
        for grid in ((1, 2), (2, 1)):
            _check(model_type, grid)


def test_tp2d_2x2_equals_tp1():
    run_world(_world4, 4, timeout_s=240)


def test_tp2d_1x2_and_2x1_equal_tp1():
    run_world(_world2, 2, timeout_s=240)


def test_unsupported_models_are_refused():
    """MoE models stop with a one-line error naming the feature (no process groups needed)."""
    import mindspeed_models as mm
    from mindspeed_models.tp2d import TP2DSettings, enable_tp2d
    from mindspeed_parallel.tp2d import Grid2D, TP2DGroups

    spec = mm.from_hf_config({"model_type": "qwen3_moe", **SIZES, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
                              "moe_intermediate_size": 16})  # fmt: skip
    settings = TP2DSettings(TP2DGroups(grid=Grid2D((0,), 1, 1), x_group=None, y_group=None, x=0, y=0))
    with pytest.raises(ValueError, match="TP-2D with MoE layers is not implemented"):
        enable_tp2d(spec, settings)
