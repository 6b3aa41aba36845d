"""fused_linear_cross_entropy with a vocabulary split over a 2-process gloo group, against the
single-process ``F.cross_entropy(hidden @ weight.T)`` on the full weight."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mindspeed_kernels.ops import fused_linear_cross_entropy
from mindspeed_kernels.testing import assert_close, run_world

WORLD = 2
IGNORE = -100
DEADLINE_S = 90  # the whole spawn; collectives time out after half of it, so a hang fails

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(120), pytest.mark.slow]


def naive(hidden, weight, labels, reduction):
    logits = hidden.float() @ weight.float().T
    loss = F.cross_entropy(logits.reshape(-1, weight.shape[0]), labels.reshape(-1), ignore_index=IGNORE, reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss


def make(shape, hidden_size, vocab, dtype):
    """Identical on every rank (fixed seed): hidden and labels are replicated across the group."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(*shape, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    flat = labels.view(-1)
    flat[:3] = torch.tensor([vocab // WORLD - 1, vocab // WORLD, IGNORE])  # both sides of the shard boundary
    return hidden, weight, labels


def grads(fn, hidden, weight, labels, need=("hidden", "weight"), **kwargs):
    h = hidden.detach().clone().requires_grad_("hidden" in need)
    w = weight.detach().clone().requires_grad_("weight" in need)
    loss = fn(h, w, labels, **kwargs)
    up = torch.tensor(3.7) if loss.dim() == 0 else torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) * 2
    (loss * up).sum().backward()
    return loss.detach(), h.grad, w.grad


def check_case(rank, reduction, chunk_size, dtype=torch.float32, shape=(3, 7), need=("hidden", "weight")):
    hidden, weight, labels = make(shape, 8, 26, dtype)
    rows = slice(rank * 13, (rank + 1) * 13)
    loss, dh, dw = grads(
        fused_linear_cross_entropy, hidden, weight[rows], labels, need, reduction=reduction,
        chunk_size=chunk_size, process_group=dist.group.WORLD,
    )  # fmt: skip
    ref_loss, ref_dh, ref_dw = grads(naive, hidden.float(), weight.float(), labels, reduction=reduction)
    assert_close(loss, ref_loss, torch.float32)
    if "hidden" in need:
        assert dh.dtype == dtype
        assert_close(dh, ref_dh, dtype)
    if "weight" in need:
        assert dw.dtype == dtype and dw.shape == (13, 8)
        assert_close(dw, ref_dw[rows], dtype)


def check_no_grad(rank):
    hidden, weight, labels = make((3, 7), 8, 26, torch.float32)
    for reduction in ("mean", "sum", "none"):
        with torch.no_grad():
            loss = fused_linear_cross_entropy(
                hidden, weight[rank * 13 : (rank + 1) * 13], labels, reduction=reduction, process_group=dist.group.WORLD
            )
        assert_close(loss, naive(hidden, weight, labels, reduction))


def check_collective_count(rank):
    """Per chunk: one all-gather of the row statistics and one all-reduce of the hidden gradient."""
    calls = {"all_gather": 0, "all_reduce": 0}
    originals = {name: getattr(dist, name) for name in calls}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return wrapper

    for name in calls:
        setattr(dist, name, counting(name))
    try:
        check_case(rank, "mean", chunk_size=5)  # 21 tokens -> 5 chunks
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    assert calls == {"all_gather": 5, "all_reduce": 5}, calls


def run_checks(rank, checks):
    """One rank: every (function name, kwargs) check in order."""
    for name, kwargs in checks:
        globals()[name](rank, **kwargs)


def test_vocab_parallel_matches_full_vocabulary():
    checks = [
        ("check_case", {"reduction": reduction, "chunk_size": chunk_size})
        for reduction in ("mean", "sum", "none")
        for chunk_size in (4, 64)  # 4 does not divide the 21 tokens, 64 exceeds them
    ]
    checks += [
        ("check_case", {"reduction": "mean", "chunk_size": 5, "dtype": torch.bfloat16}),
        ("check_case", {"reduction": "none", "chunk_size": 5, "dtype": torch.float16}),
        ("check_case", {"reduction": "sum", "chunk_size": 3, "shape": (21,), "need": ("weight",)}),
        ("check_case", {"reduction": "none", "chunk_size": 3, "need": ("hidden",)}),
        ("check_no_grad", {}),
        ("check_collective_count", {}),
    ]
    run_world(run_checks, WORLD, checks, timeout_s=DEADLINE_S / 2)
