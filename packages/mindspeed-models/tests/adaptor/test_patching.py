"""The patch mechanisms on stand-in modules: code-constant rewrites, the torch namespace, attribute
replacement, drift detection, and the rollback of a partly applied install."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from mindspeed_models import adaptor
from mindspeed_models.adaptor import patching
from mindspeed_models.adaptor.patching import MISSING, DeviceTorch, SeamDrift, rewrite_code
from mindspeed_models.adaptor.seams import Seam

FAKE = "megatron.core._adaptor_test_stand_in"


def _uses_cuda_literals(x):
    buffers = [torch.zeros(1, device="cuda") for _ in range(1)]  # nested code object (comprehension)
    if x.type() in ["torch.cuda.HalfTensor", "torch.cuda.BFloat16Tensor"]:  # a constant tuple
        return "half", buffers
    return x.cuda()


def test_rewrite_code_reaches_nested_code_and_constant_tuples():
    code, count = rewrite_code(_uses_cuda_literals.__code__, {"cuda": "cpu", "torch.cuda.HalfTensor": "torch.HalfTensor"}, {})
    assert count == 2
    nested = [c for c in code.co_consts if isinstance(c, types.CodeType)]
    assert any("cpu" in c.co_consts for c in nested)
    assert ("torch.HalfTensor", "torch.cuda.BFloat16Tensor") in code.co_consts
    _, names = rewrite_code(_uses_cuda_literals.__code__, {}, {"cuda": "cpu"})
    assert names == 1


def test_rewritten_function_runs_on_cpu():
    def make(n):
        return torch.zeros(n, device="cuda")

    make.__code__, _ = rewrite_code(make.__code__, {"cuda": "cpu"}, {})
    assert make(2).device.type == "cpu"


def test_device_torch_is_torch_except_cuda():
    shim = object()
    namespace = DeviceTorch("cpu", shim)
    assert namespace.cuda is shim
    assert namespace.zeros is torch.zeros and namespace.Tensor is torch.Tensor
    assert "zeros" in vars(namespace), "looked-up attributes are cached"
    assert torch.cuda is not shim
    with pytest.raises(AttributeError):
        namespace.no_such_attribute  # noqa: B018


def _stand_in() -> types.ModuleType:
    module = types.ModuleType(FAKE)
    module.torch = torch
    exec("def alloc(n):\n    return torch.zeros(n, device='cuda')\n", module.__dict__)
    return module


def _row(target: str, kind: str) -> Seam:
    return Seam(FAKE.removeprefix("megatron.core."), target, kind, ("x",), (1,), "cpu", "npu", "test")


def test_apply_patches_in_order_and_rolls_back_on_drift(monkeypatch):
    module = _stand_in()
    monkeypatch.setitem(sys.modules, FAKE, module)
    original_code = module.alloc.__code__
    good = (_row("torch", "torch"), _row("alloc", "device"))
    patches = adaptor._apply("cpu", good)
    assert isinstance(module.torch, DeviceTorch) and module.alloc(1).device.type == "cpu"
    for patch in reversed(patches):
        patch.undo()
    assert module.torch is torch and module.alloc.__code__ is original_code

    with pytest.raises(SeamDrift, match="missing_function"):
        adaptor._apply("cpu", good + (_row("missing_function", "device"),))
    assert module.torch is torch and module.alloc.__code__ is original_code, "a failed install undoes its patches"


def test_a_rewrite_that_finds_nothing_is_drift(monkeypatch):
    module = _stand_in()
    monkeypatch.setitem(sys.modules, FAKE, module)
    with pytest.raises(SeamDrift, match="none of"):
        patching.patch_code(_row("alloc", "tensor_type"), module, {"torch.cuda.FloatTensor": "torch.FloatTensor"}, {})


def test_attr_patch_of_an_unbound_name_is_undone_by_deleting_it(monkeypatch):
    module = _stand_in()
    patch = patching.patch_attr(_row("te_general_gemm", "attr"), module, lambda original: None if original is MISSING else 1)
    assert module.te_general_gemm is None and patch.original is MISSING
    patch.undo()
    assert not hasattr(module, "te_general_gemm")
