"""NDMM linear == torch.nn.functional.linear on the full tensors (output, dx, dW, db): fp32 within
1e-5, fp64 within 1e-12 (max abs), for every nd*-dim1-size that divides the TP size (world 4:
1, 2, 4; world 2: 1, 2), plus an RMSNorm -> fc1 (nd1-dim1-size) -> gelu -> fc2 (nd2-dim1-size)
chain between `split_nd` and `gather_nd`.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mindspeed_kernels.testing import run_world
from mindspeed_parallel.ndmm import NdParallelLinear, gather_nd, make_ndmm_groups, nd_linear, shard_nd_linear, split_nd
from mindspeed_parallel.tp2d import RMSNorm2D

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]

S, B, IN, OUT, FFN = 4, 2, 8, 12, 16
ATOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _close(actual, expected, atol, label):
    err = (actual.detach() - expected.detach()).abs().max().item()
    assert err <= atol, f"{label}: max abs error {err:.3g} > {atol}"


def _linear_case(groups, dtype, lead, bias, label):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, IN, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(OUT, IN, generator=gen, dtype=torch.float64) / IN**0.5).to(dtype)
    b = torch.randn(OUT, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    probe = torch.randn(*lead, OUT, generator=gen, dtype=torch.float64).to(dtype)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    br = b.clone().requires_grad_() if bias else None
    ref = F.linear(xr, wr, br)
    (ref * probe).sum().backward()

    tp, t = groups.tp_x * groups.tp_y, groups.y * groups.tp_x + groups.x
    layer = NdParallelLinear.from_full(w, b, dim1_group=groups.x_group, dim2_group=groups.y_group)
    x_local = x.chunk(tp, dim=-1)[t].clone().requires_grad_()
    y = layer(x_local)
    (y * probe.chunk(tp, dim=-1)[t]).sum().backward()
    atol = ATOL[dtype]
    w_ref, b_ref = shard_nd_linear(wr.grad, br.grad if bias else None, groups.x, groups.tp_x, groups.y, groups.tp_y)
    _close(y, ref.chunk(tp, dim=-1)[t], atol, f"{label} y")
    _close(x_local.grad, xr.grad.chunk(tp, dim=-1)[t], atol, f"{label} dx")
    _close(layer.weight.grad, w_ref, atol, f"{label} dW")
    if bias:
        _close(layer.bias.grad, b_ref, atol, f"{label} db")


def _chain(nd1, nd2, world) -> None:
    """RMSNorm (stats over TP) -> fc1 (nd1 grid) -> gelu -> fc2 (nd2 grid), fp64, vs the plain chain."""
    gen = torch.Generator().manual_seed(1)
    f64 = {"generator": gen, "dtype": torch.float64}
    x, g = torch.randn(S, B, IN, **f64), 1 + 0.3 * torch.randn(IN, **f64)
    w1, b1, w2, b2 = (
        torch.randn(FFN, IN, **f64) / 3,
        torch.randn(FFN, **f64),
        torch.randn(IN, FFN, **f64) / 4,
        torch.randn(IN, **f64),
    )
    probe = torch.randn(S, B, IN, **f64)
    refs = [t.clone().requires_grad_() for t in (x, g, w1, b1, w2, b2)]
    xr, gr, w1r, b1r, w2r, b2r = refs
    ref = F.linear(F.gelu(F.linear(F.rms_norm(xr, (IN,), gr, 1e-6), w1r, b1r)), w2r, b2r)
    (ref * probe).sum().backward()

    norm = RMSNorm2D.from_full(g, world, 1e-6)
    fc1 = NdParallelLinear.from_full(w1, b1, dim1_group=nd1.x_group, dim2_group=nd1.y_group)
    fc2 = NdParallelLinear.from_full(w2, b2, dim1_group=nd2.x_group, dim2_group=nd2.y_group)
    x_full = x.clone().requires_grad_()
    hidden = fc2(F.gelu(fc1(norm(split_nd(x_full, nd1.x_group, nd1.y_group)))))
    out = gather_nd(hidden, nd2.x_group, nd2.y_group)
    (out * probe).sum().backward()
    label, atol = f"chain nd1={nd1.tp_x} nd2={nd2.tp_x}", ATOL[torch.float64]
    _close(out, ref, atol, f"{label} out")
    _close(x_full.grad, xr.grad, atol, f"{label} dx")
    _close(norm.weight.grad, gr.grad.chunk(nd1.tp_x * nd1.tp_y)[dist.get_rank()], atol, f"{label} dnorm")
    for layer, grid, wg, bg in ((fc1, nd1, w1r.grad, b1r.grad), (fc2, nd2, w2r.grad, b2r.grad)):
        w_ref, b_ref = shard_nd_linear(wg, bg, grid.x, grid.tp_x, grid.y, grid.tp_y)
        _close(layer.weight.grad, w_ref, atol, f"{label} dW")
        _close(layer.bias.grad, b_ref, atol, f"{label} db")


def world_cases(rank: int) -> None:
    world = dist.get_world_size()
    tp_ranks = list(range(world))
    grids = {d1: make_ndmm_groups(tp_ranks, d1) for d1 in range(1, world + 1) if world % d1 == 0}
    for (d1, groups), dtype, lead, bias in itertools.product(grids.items(), ATOL, ((S, B), (S,)), (True, False)):
        assert groups.y * d1 + groups.x == rank
        _linear_case(groups, dtype, lead, bias, f"d1={d1} {dtype} lead={lead} bias={bias}")
    for d1, d2 in itertools.product(grids, repeat=2):
        _chain(grids[d1], grids[d2], dist.group.WORLD)
    g = grids[min(d for d in grids if d > 1)]
    with pytest.raises(ValueError, match="must divide by tp"):
        NdParallelLinear(IN + 1, OUT, dim1_group=g.x_group, dim2_group=g.y_group)
    with pytest.raises(ValueError, match="IN/d2"):
        nd_linear(torch.zeros(2, IN), torch.zeros(OUT, IN), None, g.x_group, g.y_group)


def test_ndmm_world_4():
    run_world(world_cases, 4, timeout_s=120)


def test_ndmm_world_2():
    run_world(world_cases, 2, timeout_s=120)


def test_shard_nd_linear_matches_mindspeed_layout():
    # tp = 4, d1 = 2, d2 = 2, OUT = 8 (blocks of 2 rows), IN = 4 (halves of 2 columns):
    # rank (i, j) holds row blocks i and i + d1 of column half j.
    w, b = torch.arange(32.0).reshape(8, 4), torch.arange(8.0)
    w00, b00 = shard_nd_linear(w, b, 0, 2, 0, 2)
    w11, b11 = shard_nd_linear(w, b, 1, 2, 1, 2)
    assert torch.equal(w00, w[[0, 1, 4, 5]][:, :2]) and torch.equal(b00, b[0:2])
    assert torch.equal(w11, w[[2, 3, 6, 7]][:, 2:]) and torch.equal(b11, b[6:8])  # t = j*d1 + i = 3
    with pytest.raises(ValueError, match="divisible by tp=4"):
        shard_nd_linear(torch.zeros(6, 4), None, 0, 2, 0, 2)
    with pytest.raises(ValueError, match="dim1_size=3"):
        make_ndmm_groups([0, 1, 2, 3], 3)
