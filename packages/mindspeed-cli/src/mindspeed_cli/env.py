"""``mindspeed env``: Python, library versions, the device kind and the collective backend.

torch is imported only here and only if installed (the CLI itself needs nothing but Python).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import platform

LIBRARIES = ("torch", "torch_npu", "megatron-core", "transformers", "safetensors")


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def device_and_backend() -> tuple[str, str]:
    """('npu'|'cuda'|'cpu', 'hccl'|'nccl'|'gloo') as a training launch would pick them."""
    if importlib.util.find_spec("torch") is None:
        return "cpu (torch not installed)", "gloo"
    import torch

    if importlib.util.find_spec("torch_npu") is not None:
        import torch_npu  # noqa: F401  (registers torch.npu)

        if torch.npu.is_available():
            return f"npu x{torch.npu.device_count()}", "hccl"
    if torch.cuda.is_available():
        return f"cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})", "nccl"
    return "cpu", "gloo"


def kernel_backends() -> str:
    """mindspeed-kernels' backends and why each unusable one is, when that package is installed."""
    if importlib.util.find_spec("mindspeed_kernels") is None:
        return "mindspeed-kernels not installed"
    from mindspeed_kernels import registry

    return "; ".join(f"{name} {'ok' if why is None else '- ' + why}" for name, why in registry.availability().items())


def main(argv: list[str]) -> int:
    if argv:
        print(f"error: mindspeed env takes no arguments (got {' '.join(argv)})")
        return 2
    device, backend = device_and_backend()
    rows = [("python", platform.python_version()), *((lib, _version(lib)) for lib in LIBRARIES),
            ("device", device), ("collective backend", backend), ("kernel backends", kernel_backends())]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
