"""TorchZipWriter: files torch.load reads (mmap and weights_only included) exactly like torch.save's."""

from __future__ import annotations

import argparse

import pytest
import torch

from mindspeed_ckpt.torch_zip import TensorRef, TorchZipWriter


def _load(path, **kw):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True, **kw)


def _tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    return {
        "fp32": base,
        "bf16": base.to(torch.bfloat16),
        "fp16": base.to(torch.float16),
        "int64": torch.arange(-5, 7),
        "int32": torch.arange(12, dtype=torch.int32).reshape(3, 4),
        "uint8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": base > 0,
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "empty_bf16": torch.empty(3, 0, dtype=torch.bfloat16),
        "transposed": base.t(),  # non-contiguous
        "row_block": base[2:4],  # a view with a storage offset
        "strided": base[:, ::3],
    }


def _write(path, tensors, extra):
    with TorchZipWriter(path) as w:
        refs = {k: w.add(t) for k, t in tensors.items()}
        w.close({"model": refs, **extra})
    return w


@pytest.mark.parametrize("mmap", [False, True])
def test_round_trip_matches_torch_save(tmp_path, mmap):
    tensors = _tensors()
    extra = {"args": argparse.Namespace(tp=2, name="x"), "checkpoint_version": 3.0, "iteration": 1}
    _write(tmp_path / "ours.pt", tensors, extra)
    torch.save({"model": tensors, **extra}, tmp_path / "ref.pt")
    ours, ref = _load(tmp_path / "ours.pt", mmap=mmap), _load(tmp_path / "ref.pt", mmap=mmap)
    assert ours.keys() == ref.keys()
    assert list(ours["model"]) == list(ref["model"])
    for k, t in ref["model"].items():
        o = ours["model"][k]
        assert o.dtype == t.dtype and o.shape == t.shape and o.is_contiguous(), k
        assert torch.equal(o, t), k
    assert vars(ours["args"]) == vars(ref["args"])
    assert (ours["checkpoint_version"], ours["iteration"]) == (3.0, 1)


def test_only_written_bytes_are_stored(tmp_path):
    big = torch.zeros(1000, 100)
    w = _write(tmp_path / "a.pt", {"slice": big[10:12]}, {})
    assert w.bytes_written == 2 * 100 * 4  # the view's bytes, not its base's storage
    assert (tmp_path / "a.pt").stat().st_size < 10_000
    assert torch.equal(_load(tmp_path / "a.pt")["model"]["slice"], big[10:12])


def test_refs_can_nest_anywhere(tmp_path):
    with TorchZipWriter(tmp_path / "n.pt") as w:
        a, b = w.add(torch.ones(2)), w.add(torch.zeros(3, dtype=torch.int8))
        w.close({"model0": {"a": a}, "model1": {"b": b}, "list": [a, (b, 1)]})
    d = _load(tmp_path / "n.pt", mmap=True)
    assert torch.equal(d["model0"]["a"], torch.ones(2)) and d["list"][1][1] == 1
    assert torch.equal(d["list"][1][0], torch.zeros(3, dtype=torch.int8))


def test_refs_describe_tensors():
    ref = TensorRef("0", torch.bfloat16, (3, 4))
    assert ref.nbytes() == 24


def test_bad_input(tmp_path):
    w = TorchZipWriter(tmp_path / "b.pt")
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        w.add([1, 2])
    with pytest.raises(TypeError, match="add it with add"):
        w.close({"model": {"raw": torch.ones(1)}})
    w.close({})
    with pytest.raises(ValueError, match="already closed"):
        w.add(torch.ones(1))
