"""install(): without it megatron-core fails on CPU and with it the same model runs; it is
idempotent, refuses a second device, patches exactly the rows of the seam table, and leaves torch
and megatron-core untouched for CUDA. Each check runs in a fresh process (install is per process)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import models_mcore_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)
import pytest
import torch

from mindspeed_kernels.testing import run_world
from mindspeed_models import adaptor

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]




def _current(patch) -> object:
    owner = patch.owner
    return owner.__dict__.get(patch.attr) if isinstance(owner, type) else getattr(owner, patch.attr)


def _rebound_modules() -> set[str]:
    """megatron.core modules whose global ``torch`` is not torch: found by scanning, not from the table."""
    return {
        name.removeprefix("megatron.core.")
        for name, module in list(sys.modules.items())
        if name.startswith("megatron.core.") and isinstance(module, types.ModuleType)
        and "torch" in vars(module) and vars(module)["torch"] is not torch
    }  # fmt: skip


def _cpu_world(rank: int) -> None:
    no_cuda = "Torch not compiled with CUDA"
    with pytest.raises(AssertionError, match=no_cuda):
        helpers.init_parallel()  # imports megatron.core (install below runs after it); the RNG tracker fails
    data = helpers.batch(seed=3)
    model = helpers.build_gpt(helpers.tiny_config())
    with pytest.raises(AssertionError, match=no_cuda):
        model(input_ids=data["input_ids"], position_ids=data["position_ids"], attention_mask=None)
    assert adaptor.installed() is None and _rebound_modules() == set()

    adaptor.install()  # None: mindspeed_kernels.accelerator.device_type(), "cpu" here
    assert adaptor.installed() == "cpu"
    helpers.init_parallel()
    logits = model(input_ids=data["input_ids"], position_ids=data["position_ids"], attention_mask=None)
    assert logits.shape == (2, helpers.SEQ, helpers.VOCAB) and torch.isfinite(logits).all()

    patches = adaptor.applied()
    adaptor.install("cpu")
    adaptor.install(torch.device("cpu"))
    assert adaptor.applied() is patches, "a second install must be a no-op"
    with pytest.raises(ValueError, match="already adapted to 'cpu'"):
        adaptor.install("cuda")

    rows = adaptor.seams_for("cpu")
    assert [p.seam for p in patches] == list(rows)
    assert _rebound_modules() == {s.module for s in rows if s.kind == "torch"}
    last = {(id(p.owner), p.attr): p for p in patches}  # a function may carry two code rows; the last one is live
    gone = {"device": "cuda", "tensor_type": "torch.cuda.FloatTensor"}
    for patch in patches:
        assert patch.replacement is not patch.original, patch.seam.key
        assert _current(patch) is patch.replacement or last[id(patch.owner), patch.attr] is not patch, patch.seam.key
        if patch.seam.kind in gone:
            assert gone[patch.seam.kind] not in _all_consts(patch.owner.__code__), patch.seam.key
        if patch.seam.kind == "method":
            assert "cuda" not in patch.owner.__code__.co_names and "cpu" in patch.owner.__code__.co_names
    assert torch.cuda.current_device is _REAL_CUDA["current_device"], "torch itself is never patched on cpu"


def _all_consts(code: types.CodeType) -> list:
    out = []
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out += _all_consts(const)
        elif isinstance(const, (tuple, frozenset)):
            out += list(const)
        else:
            out.append(const)
    return out


_REAL_CUDA = {name: getattr(torch.cuda, name) for name in adaptor.seams.SHIM_CALLS}


def _snapshot() -> dict:
    """Identity of everything a cpu install would touch, plus torch.cuda and torch.Tensor methods."""
    snap = {("torch.cuda", name): getattr(torch.cuda, name) for name in adaptor.seams.SHIM_CALLS}
    snap.update({("torch.Tensor", name): getattr(torch.Tensor, name) for name in ("type", "cuda", "to")})
    for seam in adaptor.SEAMS:
        module = importlib.import_module(seam.full_module)
        *path, attr = seam.target.split(".")
        owner = module
        for part in path:
            owner = getattr(owner, part)
        value = vars(owner).get(attr)
        if seam.kind in ("device", "tensor_type", "method"):
            value = getattr(value, "__func__", value).__code__
        snap[seam.key] = value
    return snap


def _cuda_world(rank: int) -> None:
    before = _snapshot()
    adaptor.install("cuda")
    assert adaptor.installed() == "cuda" and adaptor.applied() == ()
    after = _snapshot()
    assert all(after[key] is value for key, value in before.items()), "install('cuda') must change nothing"
    assert _rebound_modules() == set()
    with pytest.raises(ValueError, match="already adapted to 'cuda'"):
        adaptor.install("cpu")


def test_without_install_megatron_fails_on_cpu_and_install_fixes_it_exactly_per_the_table():
    run_world(_cpu_world, 1, timeout_s=60)


def test_install_cuda_leaves_torch_and_megatron_untouched():
    run_world(_cuda_world, 1, timeout_s=60)


@pytest.mark.parametrize("bad", ["tpu", "", 0, "cpux"])
def test_bad_device_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="install\\(device="):
        adaptor.install(bad)
