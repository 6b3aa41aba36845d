"""RMSNorm2D / LayerNorm2D over a split hidden dim == torch's rms_norm / layer_norm on the full
tensors (output, dx, dweight, dbias): fp32 within 1e-5, fp64 within 1e-12 (max abs).

TP-2D layout ``[S/x, B, H/y]``: statistics over the y group, weight gradients summed over the x
group (``grad_reduce_group``, or by hand when it is None). NDMM layout ``[S, B, H/tp]``: the
whole world is the hidden group. A LayerNorm input with a large common offset checks the
parallel variance is as accurate as torch's own fp32 layer_norm.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mindspeed_kernels.testing import run_world
from mindspeed_parallel.tp2d import LayerNorm2D, RMSNorm2D, make_tp2d_groups, rms_norm_2d, shard_2d

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]

S, B, H = 8, 2, 16
ATOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _problem(dtype, offset=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(S, B, H, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype)
    w = (1 + 0.5 * torch.randn(H, generator=gen, dtype=torch.float64)).to(dtype)
    b = torch.randn(H, generator=gen, dtype=torch.float64).to(dtype)
    probe = torch.randn(S, B, H, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, b, probe


def _reference(kind, x, w, b, probe, eps):
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    br = b.clone().requires_grad_() if b is not None else None
    y = F.rms_norm(xr, (H,), wr, eps) if kind == "rms" else F.layer_norm(xr, (H,), wr, br, eps)
    (y * probe).sum().backward()
    return y.detach(), xr.grad, wr.grad, br.grad if br is not None else None


def _close(actual, expected, atol, label):
    err = (actual.detach() - expected.detach()).abs().max().item()
    assert err <= atol, f"{label}: max abs error {err:.3g} > {atol}"


def _run(kind, seq_group, hidden_group, dtype, bias, reduce_in_layer, label):
    """One case on the layout [S/P_seq, B, H/P_hidden] (seq_group None = every rank has all S)."""
    eps = 1e-6 if kind == "rms" else 1e-5
    x, w, b, probe = _problem(dtype)
    b = b if bias and kind == "layer" else None
    y_ref, dx_ref, dw_ref, db_ref = _reference(kind, x, w, b, probe, eps)
    si, sn = (dist.get_rank(seq_group), dist.get_world_size(seq_group)) if seq_group is not None else (0, 1)
    hi, hn = dist.get_rank(hidden_group), dist.get_world_size(hidden_group)
    grad_group = seq_group if reduce_in_layer else None
    if kind == "rms":
        norm = RMSNorm2D.from_full(w, hidden_group, eps, grad_reduce_group=grad_group)
    else:
        norm = LayerNorm2D.from_full(w, b, hidden_group, eps, grad_reduce_group=grad_group)
    x_local = shard_2d(x, si, sn, hi, hn).clone().requires_grad_()
    y = norm(x_local)
    (y * shard_2d(probe, si, sn, hi, hn)).sum().backward()
    params = [(norm.weight, dw_ref)] + ([(norm.bias, db_ref)] if kind == "layer" and bias else [])
    if seq_group is not None and not reduce_in_layer:
        for p, _ in params:
            dist.all_reduce(p.grad, group=seq_group)
    atol = ATOL[dtype]
    _close(y, shard_2d(y_ref, si, sn, hi, hn), atol, f"{label} y")
    _close(x_local.grad, shard_2d(dx_ref, si, sn, hi, hn), atol, f"{label} dx")
    for p, ref in params:
        _close(p.grad, ref.chunk(hn)[hi], atol, f"{label} dparam")


def _large_offset_layer_norm(group) -> None:
    """fp32 x = N(0, 4) + 1e3: error vs the fp64 result at most 2x torch's fp32 layer_norm error."""
    x, w, b, probe = _problem(torch.float64, offset=1e3)
    y64 = F.layer_norm(x, (H,), w, b)
    x32 = x.float()
    torch_err = (F.layer_norm(x32, (H,), w.float(), b.float()).double() - y64).abs().max().item()
    hi, hn = dist.get_rank(group), dist.get_world_size(group)
    ours = LayerNorm2D.from_full(w.float(), b.float(), group)(shard_2d(x32, 0, 1, hi, hn))
    our_err = (ours.double() - shard_2d(y64, 0, 1, hi, hn)).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-6, f"offset layer_norm: error {our_err:.3g} vs torch fp32 {torch_err:.3g}"


def world_cases(rank: int, grids: list) -> None:
    world = dist.group.WORLD
    for tp_x, tp_y in grids:
        g = make_tp2d_groups(range(dist.get_world_size()), tp_x, tp_y)
        for kind, dtype, bias, reduce_in_layer in itertools.product(("rms", "layer"), ATOL, (True, False), (True, False)):
            if kind == "rms" and not bias:
                continue
            label = f"{tp_x}x{tp_y} {kind} {dtype} bias={bias} reduce_in_layer={reduce_in_layer}"
            _run(kind, g.x_group, g.y_group, dtype, bias, reduce_in_layer, label)
    for kind, dtype in itertools.product(("rms", "layer"), ATOL):  # NDMM: hidden split over all ranks
        _run(kind, None, world, dtype, True, False, f"ndmm {kind} {dtype}")
    _large_offset_layer_norm(world)
    with pytest.raises(ValueError, match="hidden_size=15"):
        RMSNorm2D(15, world)
    with pytest.raises(ValueError, match="H/P"):
        rms_norm_2d(torch.zeros(2, H), torch.ones(H // dist.get_world_size()), world)


def test_norms_2x2_grid():
    run_world(world_cases, 4, [(2, 2)], timeout_s=120)


def test_norms_1x2_and_2x1_grids():
    run_world(world_cases, 2, [(1, 2), (2, 1)], timeout_s=120)
