"""The mechanisms that apply one `seams.Seam` row, and undo it if a later row fails.

- `DeviceTorch`: the ``torch`` a patched megatron module sees: a module object whose ``cuda`` is
  the device shim and whose every other attribute is real ``torch``'s (looked up once, then
  cached in the instance, so the hot path is a plain module-attribute lookup).
- `rewrite_code`: a function's code object with some string constants (``"cuda"``,
  ``'torch.cuda.FloatTensor'``, also inside constant tuples and nested code) or attribute names
  (``.cuda``) replaced. Same bytecode, so there is no runtime cost.
- attribute replacement for module functions and class attributes;
- a logging filter on a module's logger (the ``filters`` list is replaced, so undo restores it).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import types
from dataclasses import dataclass
from typing import Any

import torch


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # the original of an attribute the module never bound


class SeamDrift(RuntimeError):
    """A seam's target is not where the table says: megatron-core changed; update seams.py."""


class DeviceTorch(types.ModuleType):
    """``torch`` with ``cuda`` replaced by ``shim`` (the rebinding target of ``torch`` seams)."""

    def __init__(self, device: str, shim: Any) -> None:
        super().__init__("torch", f"torch as adapted megatron-core modules see it on {device}")
        self.__dict__["cuda"] = shim
        self.__dict__["adaptor_device"] = device

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        self.__dict__[name] = value
        return value

    def __repr__(self) -> str:
        return f"<module 'torch' adapted to {self.adaptor_device} by mindspeed_models.adaptor>"


@dataclass(frozen=True)
class Patch:
    """One applied seam: ``owner.attr`` was ``original`` and is now ``replacement``."""

    seam: Any
    owner: Any
    attr: str
    original: Any
    replacement: Any

    def undo(self) -> None:
        if self.original is MISSING:
            delattr(self.owner, self.attr)
        else:
            setattr(self.owner, self.attr, self.original)


def rewrite_code(code: types.CodeType, consts: dict[str, str], names: dict[str, str]) -> tuple[types.CodeType, int]:
    """``code`` with string constants in ``consts`` and attribute/global names in ``names`` replaced
    (recursively through nested functions and comprehensions); also returns the number of
    replacements made, so a caller can tell a rewrite that found nothing."""
    count = 0
    new_consts = []
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            const, n = rewrite_code(const, consts, names)
            count += n
        elif isinstance(const, str) and const in consts:
            const, count = consts[const], count + 1
        elif isinstance(const, (tuple, frozenset)) and any(isinstance(x, str) and x in consts for x in const):
            # `x in ['a', 'b']` compiles to a constant tuple (or frozenset for sets).
            const = type(const)(consts.get(x, x) if isinstance(x, str) else x for x in const)
            count += 1
        new_consts.append(const)
    count += sum(name in names for name in code.co_names)
    new_names = tuple(names.get(name, name) for name in code.co_names)
    return code.replace(co_consts=tuple(new_consts), co_names=new_names), count


def import_seam_module(seam) -> types.ModuleType:
    """The megatron-core module of ``seam``, imported now if it was not yet."""
    try:
        return importlib.import_module(seam.full_module)
    except ImportError as exc:
        raise SeamDrift(f"{seam.full_module} cannot be imported ({exc}); update mindspeed_models/adaptor/seams.py") from exc


def resolve_owner(module: types.ModuleType, target: str) -> tuple[Any, str]:
    """``(owner, attr)`` for a dotted ``target`` inside ``module`` ("f", "Cls.meth", "Cls.__new__")."""
    *path, attr = target.split(".")
    owner: Any = module
    for part in path:
        owner = getattr(owner, part, MISSING)
        if owner is MISSING:
            raise SeamDrift(f"{module.__name__}.{target}: {part!r} not found; update mindspeed_models/adaptor/seams.py")
    return owner, attr


def function_of(owner: Any, attr: str, where: str) -> types.FunctionType:
    """The plain function behind ``owner.attr`` (unwrapping staticmethod/classmethod/decorators)."""
    raw = owner.__dict__.get(attr, MISSING) if isinstance(owner, type) else getattr(owner, attr, MISSING)
    if raw is MISSING:
        raise SeamDrift(f"{where} not found; update mindspeed_models/adaptor/seams.py")
    raw = getattr(raw, "__func__", raw)
    func = inspect.unwrap(raw)
    if not isinstance(func, types.FunctionType):
        raise SeamDrift(f"{where} is a {type(func).__name__}, not a Python function; update seams.py")
    return func


def patch_code(seam, module: types.ModuleType, consts: dict[str, str], names: dict[str, str]) -> Patch:
    """Rewrite the code of ``seam.target`` in ``module``; a rewrite that finds nothing is drift."""
    where = f"{module.__name__}.{seam.target}"
    func = function_of(*resolve_owner(module, seam.target), where)
    new_code, count = rewrite_code(func.__code__, consts, names)
    if count == 0:
        raise SeamDrift(f"{where}: none of {sorted(consts) or sorted(names)} found; update mindspeed_models/adaptor/seams.py")
    patch = Patch(seam, func, "__code__", func.__code__, new_code)
    func.__code__ = new_code
    return patch


def patch_attr(seam, module: types.ModuleType, factory) -> Patch:
    """Replace ``seam.target`` in ``module`` by ``factory(original)`` (MISSING when unbound)."""
    owner, attr = resolve_owner(module, seam.target)
    original = owner.__dict__.get(attr, MISSING) if isinstance(owner, type) else getattr(owner, attr, MISSING)
    callable_original = getattr(original, "__func__", original)  # staticmethod -> its function
    replacement = factory(callable_original)
    patch = Patch(seam, owner, attr, original, replacement)
    setattr(owner, attr, replacement)
    return patch


def patch_torch(seam, module: types.ModuleType, namespace: DeviceTorch) -> Patch:
    """Rebind ``module.torch`` to ``namespace``."""
    original = module.__dict__.get("torch", MISSING)
    if original is not torch:
        raise SeamDrift(f"{module.__name__}.torch is {original!r}, not torch; update mindspeed_models/adaptor/seams.py")
    patch = Patch(seam, module, "torch", original, namespace)
    module.torch = namespace
    return patch


def patch_log_filter(seam, module: types.ModuleType, drop_message: str) -> Patch:
    """Drop records of ``module``'s logger whose message contains ``drop_message``."""
    logger = logging.getLogger(module.__name__)

    def keep(record: logging.LogRecord) -> bool:
        return drop_message not in record.getMessage()

    original = logger.filters
    patch = Patch(seam, logger, "filters", original, [*original, keep])
    logger.filters = patch.replacement
    return patch
