"""Backend selection: explicit request, environment override, auto by device, fallback."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from mindspeed_kernels import registry


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    registry.reset()
    yield
    registry.reset()


# torch.device("npu") exists only once torch_npu is imported; selection reads only ``.type``.
NPU_DEVICE = types.SimpleNamespace(type="npu")


def _fake_backend(monkeypatch, name: str, reason: str | None) -> dict:
    """Make backend ``name`` load a module whose ops are sentinels, available or not."""
    ops = {op: (lambda *a, op=op, **k: (name, op)) for op in registry.OP_NAMES}
    module = types.SimpleNamespace(available=lambda: reason, OPS=ops)
    monkeypatch.setattr(registry.importlib, "import_module", lambda path, real=registry.importlib.import_module: (
        module if path == registry.BACKENDS[name].module else real(path)))
    return ops


def test_cpu_tensors_use_reference():
    from mindspeed_kernels.backends import reference

    assert registry.select("rms_norm", torch.device("cpu")) is reference.OPS["rms_norm"]


def test_every_backend_table_is_listed_and_reference_is_complete():
    from mindspeed_kernels.backends import reference

    assert set(registry.BACKENDS) == {"reference", "npu", "cuda"}
    assert set(reference.OPS) == set(registry.OP_NAMES)
    assert registry.availability()["reference"] is None


def test_unknown_op_and_unknown_backend_are_errors():
    with pytest.raises(KeyError, match="unknown kernel op 'nope'"):
        registry.select("nope", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"backend='triton' is not a kernel backend; choose one of reference, npu, cuda"):
        registry.select("rms_norm", torch.device("cpu"), "triton")


def test_environment_names_an_unknown_backend(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=r"^MINDSPEED_KERNEL_BACKEND='gpu' is not a kernel backend"):
        registry.select("rms_norm", torch.device("cpu"))


def test_explicit_unavailable_backend_raises_naming_the_fix(monkeypatch):
    _fake_backend(monkeypatch, "cuda", "CUDA is not available")
    expected = r"'cuda' was requested .*MINDSPEED_KERNEL_BACKEND.*CUDA is not available"
    with pytest.raises(registry.BackendUnavailable, match=expected):
        registry.select("swiglu", torch.device("cpu"), "cuda")
    monkeypatch.setenv(registry.ENV_VAR, "cuda")
    with pytest.raises(registry.BackendUnavailable):
        registry.select("swiglu", torch.device("cpu"))


def test_environment_selects_an_available_backend(monkeypatch):
    ops = _fake_backend(monkeypatch, "npu", None)
    monkeypatch.setenv(registry.ENV_VAR, "npu")
    assert registry.select("grouped_matmul", torch.device("cpu")) is ops["grouped_matmul"]
    # an explicit argument wins over the environment
    from mindspeed_kernels.backends import reference

    assert registry.select("grouped_matmul", torch.device("cpu"), "reference") is reference.OPS["grouped_matmul"]


def test_auto_selection_by_device_type(monkeypatch):
    ops = _fake_backend(monkeypatch, "cuda", None)
    assert registry.select("rms_norm", torch.device("cuda", 0)) is ops["rms_norm"]


def test_auto_selected_backend_falls_back_with_one_warning(monkeypatch, caplog):
    from mindspeed_kernels.backends import reference

    _fake_backend(monkeypatch, "npu", "cannot import it (No module named 'torch_npu')")
    with caplog.at_level(logging.WARNING, logger="mindspeed_kernels"):
        for _ in range(3):
            assert registry.select("rms_norm", NPU_DEVICE) is reference.OPS["rms_norm"]
    warnings = [r for r in caplog.records if r.name == "mindspeed_kernels"]
    assert len(warnings) == 1
    assert "'npu' not usable (cannot import it" in warnings[0].getMessage()


def test_backend_whose_import_fails_is_unavailable_not_a_crash(monkeypatch):
    real = registry.importlib.import_module

    def failing(path):
        if path == registry.BACKENDS["cuda"].module:
            raise ImportError("No module named 'triton'")
        return real(path)

    monkeypatch.setattr(registry.importlib, "import_module", failing)
    assert registry.availability()["cuda"] == "cannot import it (No module named 'triton')"
