"""TP-2D linear == torch.nn.functional.linear on the full tensors (output, dx, dW, db).

Every case shards one full problem with `shard_2d` / `ParallelLinear2D.from_full`, runs the 2D
layer on each rank and compares each rank's blocks with the same blocks of the single-process
result: fp32 within 1e-5, fp64 within 1e-12 (max abs), for every overlap option, both group
orders ("column" = ag over x, rs over y as fc1/qkv; "row" = ag over y, rs over x as fc2/proj),
with and without bias, with and without a batch dimension. Grids: 2x2 (world 4), 1x2 and 2x1
(world 2), plus 1x2 grids inside a world of two TP groups (checks `make_tp2d_groups`).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mindspeed_kernels.testing import run_world
from mindspeed_parallel.tp2d import (
    Grid2D,
    ParallelLinear2D,
    TP2DOverlap,
    gather_2d,
    linear_2d,
    make_tp2d_groups,
    shard_2d,
    shard_linear_2d,
    split_2d,
)

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]

S, B, IN, OUT, FFN = 8, 2, 8, 12, 16
ATOL = {torch.float32: 1e-5, torch.float64: 1e-12}
OVERLAPS = (
    TP2DOverlap(),
    TP2DOverlap(ag_with_matmul=True),
    TP2DOverlap(matmul_with_rs=True),
    TP2DOverlap(matmul_with_rs=True, chunks=4),
    TP2DOverlap(backward_ag_with_matmul=True),
    TP2DOverlap(ag_with_matmul=True, backward_ag_with_matmul=True),
    TP2DOverlap(matmul_with_rs=True, backward_ag_with_matmul=True),
)


def _full_problem(dtype, lead, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, IN, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(OUT, IN, generator=gen, dtype=torch.float64) / IN**0.5).to(dtype)
    b = torch.randn(OUT, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    probe = torch.randn(*lead, OUT, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, b, probe


def _record(errors: dict, key: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, label: str) -> None:
    err = (actual.detach() - expected.detach()).abs().max().item()
    assert err <= atol, f"{label} {key}: max abs error {err:.3g} > {atol}"
    errors[key] = max(errors.get(key, 0.0), err)


def _run_case(ag, rs, dtype, lead, bias, overlap, errors, label):
    """One linear case: this rank's blocks of y, dx, dW, db against F.linear on the full tensors."""
    x, w, b, probe = _full_problem(dtype, lead, bias)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    br = b.clone().requires_grad_() if bias else None
    ref = F.linear(xr, wr, br)
    (ref * probe).sum().backward()

    a, r, na, nr = dist.get_rank(ag), dist.get_rank(rs), dist.get_world_size(ag), dist.get_world_size(rs)
    layer = ParallelLinear2D.from_full(w, b, ag_group=ag, rs_group=rs, overlap=overlap)
    x_local = shard_2d(x, a, na, r, nr).clone().requires_grad_()
    y = layer(x_local)
    (y * shard_2d(probe, r, nr, a, na)).sum().backward()

    atol, key = ATOL[dtype], str(dtype).removeprefix("torch.")
    w_block, b_block = shard_linear_2d(wr.grad, br.grad if bias else None, a, na, r, nr)
    _record(errors, key, y, shard_2d(ref, r, nr, a, na), atol, f"{label} y")
    _record(errors, key, x_local.grad, shard_2d(xr.grad, a, na, r, nr), atol, f"{label} dx")
    _record(errors, key, layer.weight.grad, w_block, atol, f"{label} dW")
    if bias:
        _record(errors, key, layer.bias.grad, b_block, atol, f"{label} db")


def _linear_grid_cases(groups, errors, exhaustive: bool) -> int:
    """Every (group order, dtype, overlap); bias and batch dim on/off all combined when
    ``exhaustive``, else alternated so each overlap still meets both settings of each."""
    count = 0
    styles = {"column": (groups.x_group, groups.y_group), "row": (groups.y_group, groups.x_group)}
    extras = list(itertools.product(((S, B), (S,)), (True, False)))
    for i, ((style, (ag, rs)), dtype, overlap) in enumerate(itertools.product(styles.items(), ATOL, OVERLAPS)):
        for lead, bias in extras if exhaustive else [extras[i % len(extras)]]:
            label = f"{groups.tp_x}x{groups.tp_y} {style} {dtype} lead={lead} bias={bias} {overlap}"
            _run_case(ag, rs, dtype, lead, bias, overlap, errors, label)
            count += 1
    return count


def _mlp_chain(groups, errors) -> None:
    """norm-free MLP fc1 (ag=x, rs=y) -> gelu -> fc2 (ag=y, rs=x) between split_2d and gather_2d
    equals the plain MLP, including the gradient of the full (replicated) input."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(S, B, IN, generator=gen, dtype=torch.float64)
    w1, b1 = (
        torch.randn(FFN, IN, generator=gen, dtype=torch.float64) / IN**0.5,
        torch.randn(FFN, generator=gen, dtype=torch.float64),
    )
    w2, b2 = (
        torch.randn(IN, FFN, generator=gen, dtype=torch.float64) / FFN**0.5,
        torch.randn(IN, generator=gen, dtype=torch.float64),
    )
    probe = torch.randn(S, B, IN, generator=gen, dtype=torch.float64)
    params = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    xr, w1r, b1r, w2r, b2r = params
    (F.linear(F.gelu(F.linear(xr, w1r, b1r)), w2r, b2r) * probe).sum().backward()

    gx, gy = groups.x_group, groups.y_group
    fc1 = ParallelLinear2D.from_full(w1, b1, ag_group=gx, rs_group=gy, overlap=TP2DOverlap(ag_with_matmul=True))
    fc2 = ParallelLinear2D.from_full(w2, b2, ag_group=gy, rs_group=gx, overlap=TP2DOverlap(matmul_with_rs=True))
    x_full = x.clone().requires_grad_()
    out = gather_2d(fc2(F.gelu(fc1(split_2d(x_full, gx, gy)))), gx, gy)
    (out * probe).sum().backward()
    ref = F.linear(F.gelu(F.linear(xr, w1r, b1r)), w2r, b2r)
    label, atol = f"{groups.tp_x}x{groups.tp_y} mlp", ATOL[torch.float64]
    _record(errors, "float64", out, ref, atol, f"{label} out")
    _record(errors, "float64", x_full.grad, xr.grad, atol, f"{label} dx_full")
    w1g, b1g = shard_linear_2d(w1r.grad, b1r.grad, groups.x, groups.tp_x, groups.y, groups.tp_y)
    w2g, b2g = shard_linear_2d(w2r.grad, b2r.grad, groups.y, groups.tp_y, groups.x, groups.tp_x)
    for name, got, want in (("dW1", fc1.weight.grad, w1g), ("db1", fc1.bias.grad, b1g), ("dW2", fc2.weight.grad, w2g),
                            ("db2", fc2.bias.grad, b2g)):  # fmt: skip
        _record(errors, "float64", got, want, atol, f"{label} {name}")


def _validation(groups) -> None:
    ag, rs = groups.x_group, groups.y_group
    with pytest.raises(ValueError, match="out_features"):
        ParallelLinear2D(IN, OUT + 1, ag_group=ag, rs_group=rs)
    with pytest.raises(ValueError, match="in_features"):
        ParallelLinear2D(IN + 1, OUT, ag_group=ag, rs_group=rs)
    layer = ParallelLinear2D(IN, OUT, ag_group=ag, rs_group=rs, overlap=TP2DOverlap(matmul_with_rs=True, chunks=3))
    with pytest.raises(ValueError, match="rs group size \\* chunks"):
        layer(torch.zeros(S // 2, IN // 2))
    with pytest.raises(ValueError, match="IN/R"):
        linear_2d(torch.zeros(S // 2, IN), layer.weight, None, ag, rs)


def world_cases(rank: int, grids: list, out_dir: str) -> None:
    """All grids of ``grids`` over the whole world; a world of 4 (on 2 CPU cores, where each
    collective is slow) runs the alternating subset, then two TP groups of 2."""
    errors: dict = {}
    count = 0
    exhaustive = dist.get_world_size() == 2
    for tp_x, tp_y in grids:
        groups = make_tp2d_groups(range(dist.get_world_size()), tp_x, tp_y)
        assert (groups.x, groups.y) == (rank % tp_x, rank // tp_x)
        count += _linear_grid_cases(groups, errors, exhaustive)
        _mlp_chain(groups, errors)
        if tp_x == tp_y == 2:
            _validation(groups)
    if not exhaustive:
        _two_tp_groups(rank, errors)
    if rank == 0:
        Path(out_dir, f"errors_{len(grids)}.json").write_text(json.dumps({"cases": count, "max_abs_error": errors}))


def _two_tp_groups(rank: int, errors: dict) -> None:
    """World 4 = two TP groups of 2 ([0, 1], [2, 3]) with a 1x2 grid each: groups are local."""
    tp_ranks = [0, 1] if rank < 2 else [2, 3]
    groups = make_tp2d_groups(tp_ranks, 1, 2)
    assert groups.grid.y_group_ranks(0) == tuple(tp_ranks)
    for overlap in (OVERLAPS[0], OVERLAPS[5], OVERLAPS[6]):
        _run_case(groups.x_group, groups.y_group, torch.float64, (S, B), True, overlap, errors, f"tp-groups {overlap}")


def test_linear_2x2_grid(tmp_path, capsys):
    run_world(world_cases, 4, [(2, 2)], str(tmp_path), timeout_s=120)
    result = json.loads((tmp_path / "errors_1.json").read_text())
    assert result["cases"] == 2 * 2 * len(OVERLAPS)
    with capsys.disabled():
        print(f"\n2x2: {result}")


def test_linear_1x2_and_2x1_grids(tmp_path, capsys):
    run_world(world_cases, 2, [(1, 2), (2, 1)], str(tmp_path), timeout_s=120)
    result = json.loads((tmp_path / "errors_2.json").read_text())
    assert result["cases"] == 2 * 2 * 2 * 2 * 2 * len(OVERLAPS)
    with capsys.disabled():
        print(f"\n1x2+2x1: {result}")


def test_grid_and_option_validation():
    grid = Grid2D((0, 1, 2, 3, 4, 5), 2, 3)
    assert [grid.coords(r) for r in (0, 1, 4)] == [(0, 0), (1, 0), (0, 2)]
    assert grid.x_group_ranks(1) == (2, 3) and grid.y_group_ranks(1) == (1, 3, 5)
    with pytest.raises(ValueError, match="tp_x \\* tp_y"):
        Grid2D((0, 1, 2, 3), 2, 3)
    with pytest.raises(ValueError, match="not in tp_ranks"):
        grid.coords(7)
    with pytest.raises(ValueError, match="twice"):
        Grid2D((0, 0), 1, 2)
    with pytest.raises(ValueError, match="cannot both be on"):
        TP2DOverlap(ag_with_matmul=True, matmul_with_rs=True)
    with pytest.raises(ValueError, match="chunks"):
        TP2DOverlap(matmul_with_rs=True, chunks=0)
    with pytest.raises(ValueError, match="OUT=5"):
        shard_linear_2d(torch.zeros(5, 4), None, 0, 2, 0, 2)
    with pytest.raises(ValueError, match="shard_2d"):
        shard_2d(torch.zeros(3, 4), 0, 2, 0, 2)


def test_shard_linear_2d_blocks_tile_the_weight():
    w, b = torch.arange(48.0).reshape(6, 8), torch.arange(6.0)
    rows = [torch.cat([shard_linear_2d(w, b, a, 3, r, 2)[0] for r in range(2)], dim=1) for a in range(3)]
    assert torch.equal(torch.cat(rows), w)
    assert torch.equal(torch.cat([shard_linear_2d(w, b, a, 3, 1, 2)[1] for a in range(3)]), b)
