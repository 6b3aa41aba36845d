"""Route a validated op call to the selected backend's implementation."""

from __future__ import annotations

import torch

from mindspeed_kernels import registry


def call(op: str, like: torch.Tensor, backend: str | None, *args, **kwargs):
    """Run ``op`` on the backend chosen for ``like.device`` (or the requested ``backend``)."""
    return registry.select(op, like.device, backend)(*args, **kwargs)
