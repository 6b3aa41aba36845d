"""Which implementation of an op runs: an explicit table of backends, selected per call.

Selection, in order:
1. ``backend=`` passed to the op, else the ``MINDSPEED_KERNEL_BACKEND`` environment variable:
   that backend must be available, or the call raises :class:`BackendUnavailable`.
2. Otherwise by the input tensor's device: ``npu`` tensors -> ``npu``, ``cuda`` tensors ->
   ``cuda``, anything else -> ``reference``. An auto-selected backend that cannot load falls
   back to ``reference`` with a one-time warning on the ``mindspeed_kernels`` logger.

Every backend module exposes ``available() -> str | None`` (``None`` when usable, else the
reason it is not) and ``OPS``, a dict from op name to implementation. Every backend's table
covers every op in :data:`OP_NAMES`; where a backend has no faster path than plain torch its
table names the reference implementation on purpose.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

ENV_VAR = "MINDSPEED_KERNEL_BACKEND"
LOG = logging.getLogger("mindspeed_kernels")

OP_NAMES = (
    "rms_norm",
    "swiglu",
    "geglu",
    "rotary_pos_emb",
    "flash_attention",
    "ring_attention_update",
    "moe_token_permute",
    "moe_token_unpermute",
    "grouped_matmul",
    "fused_linear_cross_entropy",
    "linear",
)


@dataclass(frozen=True)
class Backend:
    """One backend: its name, the module holding its op table, the device type it serves."""

    name: str
    module: str
    device_type: str | None


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", "mindspeed_kernels.backends.reference", None),
    "npu": Backend("npu", "mindspeed_kernels.backends.npu", "npu"),
    "cuda": Backend("cuda", "mindspeed_kernels.backends.cuda", "cuda"),
}
AUTO_BY_DEVICE = {b.device_type: b.name for b in BACKENDS.values() if b.device_type}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (the message says why and what to do)."""


_loaded: dict[str, tuple[ModuleType | None, str | None]] = {}
_warned: set[tuple[str, str]] = set()


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    """(module, None) when the backend is usable, else (None, reason). Cached per process."""
    if name not in _loaded:
        try:
            module = importlib.import_module(BACKENDS[name].module)
            reason = module.available()
        except ImportError as exc:  # a backend's optional dependency is missing
            module, reason = None, f"cannot import it ({exc})"
        _loaded[name] = (module if reason is None else None, reason)
    return _loaded[name]


def availability() -> dict[str, str | None]:
    """Backend name -> None when usable here, else the reason it is not."""
    return {name: _load(name)[1] for name in BACKENDS}


def requested(backend: str | None = None) -> str | None:
    """The explicitly requested backend (argument first, then the environment), validated."""
    source = "backend="
    if backend is None:
        backend, source = os.environ.get(ENV_VAR) or None, f"{ENV_VAR}="
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{source}{backend!r} is not a kernel backend; choose one of {', '.join(BACKENDS)}")
    return backend


def select(op: str, device: torch.device, backend: str | None = None) -> Callable:
    """The implementation of ``op`` for inputs on ``device`` (see the module docstring)."""
    if op not in OP_NAMES:
        raise KeyError(f"unknown kernel op {op!r}")
    name = requested(backend)
    if name is not None:
        module, reason = _load(name)
        if module is None:
            raise BackendUnavailable(
                f"kernel backend {name!r} was requested (backend= or {ENV_VAR}) but {reason}; "
                f"install what it needs or request 'reference'"
            )
        return module.OPS[op]
    name = AUTO_BY_DEVICE.get(device.type, "reference")
    module, reason = _load(name)
    if module is None:
        if (name, device.type) not in _warned:
            _warned.add((name, device.type))
            LOG.warning("kernel backend %r not usable (%s); using 'reference' for %s tensors", name, reason, device.type)
        module, _ = _load("reference")
    return module.OPS[op]


def reset() -> None:
    """Forget cached availability and one-time warnings (tests; after installing a backend)."""
    _loaded.clear()
    _warned.clear()
