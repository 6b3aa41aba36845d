"""torchfile writes what torch's own zip writer writes (record names, order, data offsets), torch.load
reads it as torch.save's output, and read_index finds every tensor's bytes without torch."""

import argparse
import os
import struct
import zipfile

import pytest
import torch

from mindspeed_ckpt import torch_zip, torchfile
from mindspeed_ckpt.torch_zip import TorchZipWriter

TENSORS = {"a": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "b": torch.randn(5), "c": torch.zeros(0, 4),
           "d": torch.arange(3, dtype=torch.int64), "e": torch.tensor([True, False])}
NAMES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64", torch.bool: "BOOL"}
ARGS = {"params_dtype": torch.bfloat16, "x": [1, 2**40, -3, None, True, 1.5], "s": "hé", "t": (1, 2, 3, 4), "n": -(2**70)}


def _write(path, tensors, args, alignment=64):
    recs = [torchfile.TensorRecord(str(i), NAMES[t.dtype], tuple(t.shape)) for i, t in enumerate(tensors.values())]
    fields = {k: torchfile.Global("torch", "bfloat16") if isinstance(v, torch.dtype) else v for k, v in args.items()}
    obj = {"model": dict(zip(tensors, recs, strict=True)), "checkpoint_version": 3.0, "iteration": 1,
           "args": torchfile.Namespace(fields)}
    small = torchfile.small_records(torchfile.dumps(obj), alignment)
    sizes = [(f"data/{r.key}", r.nbytes) for r in recs] + [(n, len(c)) for n, c in small]
    records, total = torchfile.layout(path.stem, sizes, alignment)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    os.ftruncate(fd, total)
    for off, raw in torchfile.headers(path.stem, records):
        os.pwrite(fd, raw, off)
    for rec, t in zip(records, tensors.values(), strict=False):
        os.pwrite(fd, t.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), rec.data)
    for rec, (_, content) in zip(records[len(recs):], small, strict=True):
        os.pwrite(fd, content, rec.data)
    os.close(fd)
    return records


def _reference(path):
    w = TorchZipWriter(path)
    refs = {n: w.add(t) for n, t in TENSORS.items()}
    w.close({"model": refs, "checkpoint_version": 3.0, "iteration": 1, "args": argparse.Namespace(**ARGS)})


@pytest.mark.parametrize("kw", [{}, {"mmap": True}, {"mmap": True, "weights_only": True}], ids=["plain", "mmap", "weights_only"])
def test_torch_load_reads_it_as_torch_save(tmp_path, kw):
    _write(tmp_path / "ours.pt", TENSORS, ARGS)
    _reference(tmp_path / "ref.pt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        got, ref = torch.load(tmp_path / "ours.pt", **kw), torch.load(tmp_path / "ref.pt", **kw)
    assert vars(got["args"]) == vars(ref["args"]) == ARGS
    assert (got["checkpoint_version"], got["iteration"]) == (3.0, 1)
    for name, t in ref["model"].items():
        u = got["model"][name]
        assert (u.dtype, u.shape, u.stride()) == (t.dtype, t.shape, t.stride()) and torch.equal(u, t)


@pytest.mark.parametrize("alignment", [64, 4096])
def test_zip_layout_matches_torchs_writer(tmp_path, monkeypatch, alignment):
    monkeypatch.setattr(torch_zip, "ALIGNMENT", alignment)  # torch's writer with that storage alignment
    _write(tmp_path / "ours.pt", TENSORS, ARGS, alignment)
    _reference(tmp_path / "ours_ref.pt")  # same archive-name length, so the same offsets
    a, b = zipfile.ZipFile(tmp_path / "ours.pt").infolist(), zipfile.ZipFile(tmp_path / "ours_ref.pt").infolist()
    assert [i.filename.split("/", 1)[1] for i in a] == [i.filename.split("/", 1)[1] for i in b]
    data = [(i.header_offset, i.file_size, i.extra, i.flag_bits) for i in a if "/data/" in i.filename]
    assert data == [(i.header_offset, i.file_size, i.extra, i.flag_bits) for i in b if "/data/" in i.filename]
    with torch.serialization.safe_globals([argparse.Namespace]):
        got = torch.load(tmp_path / "ours.pt", mmap=True, weights_only=True)
    assert all(torch.equal(got["model"][n], t) for n, t in TENSORS.items())
    raw = (tmp_path / "ours.pt").read_bytes()
    rec = next(i for i in zipfile.ZipFile(tmp_path / "ours.pt").infolist() if i.filename.endswith(".storage_alignment"))
    name_len, extra_len = struct.unpack("<HH", raw[rec.header_offset + 26:rec.header_offset + 30])
    start = rec.header_offset + 30 + name_len + extra_len
    assert raw[start:start + rec.file_size] == str(alignment).encode()


def test_read_index_finds_the_bytes(tmp_path):
    _reference(tmp_path / "ref.pt")
    index = torchfile.read_index(tmp_path / "ref.pt")
    raw = (tmp_path / "ref.pt").read_bytes()
    for name, t in TENSORS.items():
        st = index["model"][name]
        assert (st.dtype, st.shape, st.is_contiguous()) == (NAMES[t.dtype], tuple(t.shape), True)
        assert raw[st.offset:st.offset + st.nbytes] == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    assert index["args"].params_dtype == torchfile.Global("torch", "bfloat16") and index["args"].n == ARGS["n"]


def test_what_it_cannot_read_is_not_fast(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a zip")
    with pytest.raises(torchfile.NotFast, match="x.pt"):
        torchfile.read_index(tmp_path / "x.pt")
    torch.save({"f": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")  # a pickled module class: refused, torch reads it
    with pytest.raises(torchfile.NotFast, match="unsupported global"):
        torchfile.read_index(tmp_path / "module.pt")
    with pytest.raises(TypeError, match="cannot pickle"):
        torchfile.dumps({"x": object()})
