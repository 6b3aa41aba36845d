"""The optimizer's update kernel: torch's fused AdamW where the device has it, with the same
numbers as torch's default (per-tensor) AdamW, kept fused across a state-dict load."""

from __future__ import annotations

import torch

from mindspeed_kernels.testing import assert_close
from mindspeed_train import optim


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((6, 4), (4,), (3, 5))]


def _step(opt, params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


def _adamw(params):
    groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def test_fused_update_equals_torch_default_adamw():
    fused_params, plain_params = _params(0), _params(0)
    fused, plain = _adamw(fused_params), _adamw(plain_params)
    optim._use_fused_kernel(fused)
    assert all(group["fused"] for group in fused.param_groups)
    assert not any(group.get("fused") for group in plain.param_groups)
    for seed in range(5):
        _step(fused, fused_params, seed)
        _step(plain, plain_params, seed)
    for got, want in zip(fused_params, plain_params, strict=True):
        assert_close(got.detach(), want.detach())


def test_a_loaded_state_stays_fused_with_a_step_per_parameter():
    params = _params(1)
    opt = _adamw(params)
    optim._use_fused_kernel(opt)
    opt.register_load_state_dict_post_hook(optim._use_fused_kernel)
    source_params = _params(1)
    source = _adamw(source_params)  # an unfused state dict, as older checkpoints hold
    for seed in range(3):
        _step(source, source_params, seed)
    state = source.state_dict()
    shared = torch.tensor(3.0)
    for entry in state["state"].values():
        entry["step"] = shared  # megatron's loaders put one step tensor into every parameter's state
    opt.load_state_dict(state)
    assert all(group["fused"] for group in opt.param_groups)
    steps = [opt.state[p]["step"] for p in params]
    assert len({id(step) for step in steps}) == len(params)
    assert all(step.dtype == torch.float32 and float(step) == 3.0 for step in steps)
    _step(opt, params, 7)
    assert all(float(opt.state[p]["step"]) == 4.0 for p in params)  # each counted once


def test_set_step_tensor_layouts():
    param = torch.zeros(2)
    assert optim.set_step_tensor(5, param, fused=True).device == param.device
    assert optim.set_step_tensor(torch.tensor(5.0), param, fused=False).device.type == "cpu"


def test_fused_only_where_torch_ships_the_kernel():
    # PrivateUse1 (the NPU) is in torch's list, but its kernel is its backend's business
    assert "cpu" in optim._fused_devices() and set(optim._fused_devices()) <= {"cpu", "cuda"}
    param = torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2)), param])
    optim._use_fused_kernel(opt)  # a non-float parameter in the group: left unfused
    assert not opt.param_groups[0].get("fused")
