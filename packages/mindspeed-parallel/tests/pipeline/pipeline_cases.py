"""The tiny model, data and single-process reference step the DualPipe / DualPipeV tests share."""

from __future__ import annotations

import torch
from torch import nn

HIDDEN = 16
MAX_ERR = {torch.float64: 1e-12, torch.float32: 1e-5}


def make_chunks(num_chunks, dtype, seed=0):
    """``num_chunks`` Linear+GELU chunks of width HIDDEN, the same weights for the same seed."""
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.GELU()).to(dtype) for _ in range(num_chunks)]


def make_data(num_microbatches, dtype, seed=1):
    """(inputs, labels): ``num_microbatches`` [3, HIDDEN] tensors each."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(3, HIDDEN, generator=gen, dtype=torch.float64).to(dtype) for _ in range(num_microbatches)]
    labels = [torch.randn(3, HIDDEN, generator=gen, dtype=torch.float64).to(dtype) for _ in range(num_microbatches)]
    return inputs, labels


def mse(out, label):
    return ((out - label) ** 2).mean()


def reference(chunks, inputs, labels):
    """Plain single-process step: chunks in sequence, mean of the micro-batch losses."""
    total = 0
    for x, y in zip(inputs, labels, strict=True):
        for chunk in chunks:
            x = chunk(x)
        total = total + mse(x, y)
    total = total / len(inputs)
    total.backward()
    return total.detach()
