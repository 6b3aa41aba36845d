"""CP data helpers: zig-zag / contiguous / packed splits against naive index lists, and
split -> gather round trips on 2 and 4 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mindspeed_kernels.testing import run_world
from mindspeed_parallel.cp.data import (
    contiguous_gather,
    contiguous_indices,
    contiguous_split,
    gather_packed,
    split_packed,
    zigzag_gather,
    zigzag_indices,
    zigzag_split,
)


def _naive_zigzag(length: int, cp: int, rank: int) -> list[int]:
    chunk = length // (2 * cp)
    return list(range(rank * chunk, (rank + 1) * chunk)) + list(range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk))


def _naive_contiguous(length: int, cp: int, rank: int) -> list[int]:
    chunk = length // cp
    return list(range(rank * chunk, (rank + 1) * chunk))


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_splits_and_position_ids_follow_the_layouts(cp):
    seq = 8 * cp
    x = torch.randn(2, seq, 3)
    positions = torch.arange(seq)
    for rank in range(cp):
        zz, ct = _naive_zigzag(seq, cp, rank), _naive_contiguous(seq, cp, rank)
        assert zigzag_indices(seq, cp, rank).tolist() == zz
        assert contiguous_indices(seq, cp, rank).tolist() == ct
        assert zigzag_split(positions, cp, rank, 0).tolist() == zz  # position ids of the local tokens
        assert contiguous_split(positions, cp, rank, 0).tolist() == ct
        assert torch.equal(zigzag_split(x, cp, rank, seq_dim=1), x[:, zz])
        assert torch.equal(contiguous_split(x, cp, rank, seq_dim=-2), x[:, ct])


@pytest.mark.parametrize("zigzag", [True, False])
def test_split_packed_uneven_lengths(zigzag):
    cp = 2
    lengths = [4, 12, 8] if zigzag else [2, 10, 6]
    cu = torch.tensor(lengths).cumsum(0).tolist()
    x = torch.arange(sum(lengths) * 2).reshape(-1, 2)
    naive = _naive_zigzag if zigzag else _naive_contiguous
    for rank in range(cp):
        rows, start = [], 0
        for n in lengths:
            rows += [start + i for i in naive(n, cp, rank)]
            start += n
        local, local_cu = split_packed(x, cu, cp, rank, zigzag)
        assert torch.equal(local, x[rows])
        assert local_cu == [c // cp for c in cu]
        local_t, cu_t = split_packed(x, torch.tensor(cu, dtype=torch.int32), cp, rank, zigzag)
        assert torch.equal(local_t, local) and cu_t.dtype == torch.int32 and cu_t.tolist() == local_cu


def test_bad_input_names_the_parameter_and_the_fix():
    with pytest.raises(ValueError, match=r"not divisible by 2 \* cp_size = 4; pad it by 2"):
        zigzag_split(torch.zeros(6), 2, 0, 0)
    with pytest.raises(ValueError, match="cp_rank=2"):
        contiguous_split(torch.zeros(6), 2, 2, 0)
    with pytest.raises(ValueError, match="cu_seqlens: sequence 1 has length 6"):
        split_packed(torch.zeros(10), [4, 10], 2, 0, zigzag=True)
    with pytest.raises(ValueError, match="cu_seqlens ends at 8 but x has 10"):
        split_packed(torch.zeros(10), [4, 8], 2, 0, zigzag=True)
    with pytest.raises(ValueError, match="strictly increasing"):
        split_packed(torch.zeros(8), [4, 4, 8], 2, 0, zigzag=False)
    with pytest.raises(ValueError, match="seq_dim=3"):
        zigzag_split(torch.zeros(4, 4), 2, 0, 3)


def world_round_trips(rank: int, cp: int) -> None:
    torch.set_num_threads(1)
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4 * cp, 5, generator=gen)  # seq on dim 1
    assert torch.equal(zigzag_gather(zigzag_split(x, cp, rank, 1), group, 1), x)
    assert torch.equal(contiguous_gather(contiguous_split(x, cp, rank, -2), group, -2), x)
    cu = (torch.tensor([2, 6, 4]) * 2 * cp).cumsum(0).tolist()  # uneven lengths, divisible by 2 * cp
    packed = torch.randn(cu[-1], 2, 3, generator=gen)
    for zigzag in (True, False):
        local, local_cu = split_packed(packed, cu, cp, rank, zigzag)
        assert local_cu == [c // cp for c in cu]
        assert torch.equal(gather_packed(local, cu, group, zigzag), packed)


@pytest.mark.slow  # a spawn per world size: ~7-11 s each on the shared 2-core machine
@pytest.mark.xdist_group("gloo")
@pytest.mark.timeout(300)
@pytest.mark.parametrize("cp", [2, 4])
def test_split_gather_round_trip(cp):
    run_world(world_round_trips, cp, cp, timeout_s=60)
