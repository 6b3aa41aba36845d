"""NPU (Ascend, torch_npu): ``torch.cuda`` calls of the adapted modules mapped to ``torch.npu``.

UNTESTED ON HARDWARE. The mapping follows torch_npu's documented ``torch.npu`` API (which mirrors
``torch.cuda``: ``current_device``, ``synchronize``, ``Stream``, ``Event``, ``stream``,
``current_stream``, ``default_stream``, ``get_rng_state``, ``set_rng_state``, ``manual_seed``,
``manual_seed_all``, ``default_generators``, ``empty_cache``, ``_lazy_call``). On CPU the tests
check only that the table is complete and that `install("npu")` wires it against a fake
``torch.npu``; that the real kernels behave as the CUDA ones megatron expects is an assumption.

Differences from a plain rename:

- ``current_device()`` returns ``torch.device("npu", index)``: megatron passes the result to
  ``device=``, where a bare int would mean a CUDA index.
- ``default_generators[i]`` accepts the device that ``current_device()`` returns.
- ``tensor.type()`` spells NPU tensors ``'torch.npu.FloatTensor'`` (the ``tensor_type`` seams).

Attributes outside `NPU_CALLS` pass through to ``torch.npu`` when it has them, else to the real
``torch.cuda`` (which then fails as it would without the adaptor).
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import torch

from mindspeed_models.adaptor.cpu import SHARED_REPLACEMENTS

# torch.cuda attribute -> torch.npu attribute it maps to ("" = adapted here, see the docstring).
NPU_CALLS: dict[str, str] = {
    "current_device": "",  # torch.device("npu", torch.npu.current_device())
    "synchronize": "synchronize",
    "Stream": "Stream",
    "Event": "Event",
    "stream": "stream",
    "current_stream": "current_stream",
    "default_stream": "default_stream",
    "get_rng_state": "get_rng_state",
    "set_rng_state": "set_rng_state",
    "manual_seed": "manual_seed",
    "manual_seed_all": "manual_seed_all",
    "random": "",  # namespace of get_rng_state / set_rng_state / manual_seed below
    "default_generators": "",  # indexable by int or torch.device
    "empty_cache": "empty_cache",
}


def load_torch_npu() -> types.ModuleType:
    """``torch.npu`` after importing torch_npu (which registers it), or a clear error."""
    try:
        importlib.import_module("torch_npu")
    except ImportError as exc:
        raise RuntimeError("install(device='npu') needs torch_npu: pip install torch-npu (matching torch)") from exc
    if not hasattr(torch, "npu"):
        raise RuntimeError("install(device='npu'): torch_npu imported but torch.npu is missing")
    return torch.npu


class _NpuGenerators:
    """``default_generators[i]`` for an int or a torch.device index."""

    def __init__(self, npu: types.ModuleType) -> None:
        self._npu = npu

    def __getitem__(self, index) -> torch.Generator:
        if isinstance(index, torch.device):
            index = index.index if index.index is not None else self._npu.current_device()
        return self._npu.default_generators[index]

    def __len__(self) -> int:
        return len(self._npu.default_generators)


class NpuCuda:
    """``torch.cuda`` for megatron-core modules running on Ascend (see the module docstring)."""

    def __init__(self, npu: types.ModuleType) -> None:
        self._npu = npu
        for cuda_name, npu_name in NPU_CALLS.items():
            if npu_name:
                setattr(self, cuda_name, getattr(npu, npu_name))
        self.default_generators = _NpuGenerators(npu)
        self.random = types.SimpleNamespace(
            get_rng_state=npu.get_rng_state, set_rng_state=npu.set_rng_state, manual_seed=npu.manual_seed
        )

    def current_device(self) -> torch.device:
        return torch.device("npu", self._npu.current_device())

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not set in __init__.
        npu = self.__dict__["_npu"]
        return getattr(npu, name) if hasattr(npu, name) else getattr(torch.cuda, name)

    def __repr__(self) -> str:
        return "<torch.cuda adapted to npu by mindspeed_models.adaptor>"


def _npu_lazy_call(original):
    return torch.npu._lazy_call


REPLACEMENTS = {
    **SHARED_REPLACEMENTS,
    # torch.npu queues callbacks until the NPU is initialised, as torch.cuda does for CUDA.
    ("tensor_parallel.random", "_lazy_call"): _npu_lazy_call,
}
LOG_FILTERS: dict[tuple[str, str], str] = {}
