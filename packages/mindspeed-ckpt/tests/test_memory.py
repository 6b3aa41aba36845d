"""release_pages trims the resident set of mapped inputs without changing values; bound_heap."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from mindspeed_ckpt.hf_io import HFReader, save_hf
from mindspeed_ckpt.megatron_io import load_file, save_rank
from mindspeed_ckpt.memory import bound_heap, release_pages

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status, madvise")


def _rss_file_kib() -> int:
    return int([ln for ln in open("/proc/self/status") if ln.startswith("RssFile:")][0].split()[1])


@linux
def test_release_pages_drops_mapped_rank_file_pages_and_keeps_values(tmp_path):
    want = torch.arange(16 * 2**20 // 4, dtype=torch.float32)  # 16 MiB
    path = save_rank(tmp_path, 1, 0, 0, 1, {"w": want}, None)
    w = load_file(path)["model"]["w"]
    assert torch.equal(w, want)  # touches every page
    before = _rss_file_kib()
    release_pages([w])
    assert before - _rss_file_kib() > 12 * 1024  # most of the 16 MiB left the resident set
    assert torch.equal(w, want)  # read again from the file


@linux
def test_mapped_hf_reader_release(tmp_path):
    want = torch.randn(2048, 2048)  # 16 MiB
    save_hf(tmp_path, {"model_type": "llama"}, {"a": want})
    r = HFReader(tmp_path, mapped=True)
    a = r.get("a")
    assert torch.equal(a, want)
    before = _rss_file_kib()
    r.release()
    assert before - _rss_file_kib() > 12 * 1024
    assert torch.equal(a, want)
    assert torch.equal(HFReader(tmp_path).get("a"), want)  # the pread reader agrees


def test_readers_agree_on_every_dtype(tmp_path):
    tensors = {"f": torch.randn(3, 5), "b": torch.randn(4).to(torch.bfloat16), "i": torch.arange(7), "e": torch.empty(0, 2)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    for mapped in (False, True):
        r = HFReader(tmp_path, mapped=mapped)
        for k, t in tensors.items():
            assert r.spec(k) == (t.dtype, tuple(t.shape))
            assert torch.equal(r.get(k), t), (k, mapped)


@linux
def test_bound_heap_is_idempotent():
    assert bound_heap() is bound_heap()
