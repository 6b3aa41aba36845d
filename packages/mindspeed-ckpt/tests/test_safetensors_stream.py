"""SafetensorsFile / SafetensorsWriter against the safetensors library itself."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mindspeed_ckpt.hf_io import HFWriter, plan_shards
from mindspeed_ckpt.safetensors_stream import SafetensorsFile, SafetensorsWriter


def _tensors():
    base = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    return {"w.fp32": base, "w.bf16": base.to(torch.bfloat16), "w.fp16": base.to(torch.float16),
            "i64": torch.arange(-3, 9), "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
            "u8": torch.arange(4, dtype=torch.uint8),
            "mask": base > 0, "scalar": torch.tensor(2.0), "empty": torch.empty(0, 3), "t": base.t(), "cols": base[:, 1:4]}


def _specs(tensors):
    return [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]


def test_writer_output_reads_with_safe_open(tmp_path):
    tensors = _tensors()
    order = list(reversed(list(tensors)))  # any write order
    with SafetensorsWriter(tmp_path / "a.safetensors", _specs(tensors), metadata={"format": "pt"}) as w:
        for k in order:
            w.write(k, tensors[k])
        assert w.done
        w.close()
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(tensors) and f.metadata() == {"format": "pt"}
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and torch.equal(got, t), k


def test_reader_reads_safetensors_files(tmp_path):
    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"format": "pt"})
    with SafetensorsFile(tmp_path / "b.safetensors") as f:
        assert sorted(f.keys()) == sorted(tensors) and f.metadata == {"format": "pt"}
        for k, t in tensors.items():
            assert f.spec(k) == (t.dtype, tuple(t.shape))
            got = f.get(k)
            assert got.dtype == t.dtype and torch.equal(got, t), k


def test_writer_refuses_bad_tensors(tmp_path):
    w = SafetensorsWriter(tmp_path / "c.safetensors", [("a", torch.float32, (2,)), ("b", torch.int64, (1,))])
    with pytest.raises(ValueError, match="'z' was not declared"):
        w.write("z", torch.ones(2))
    with pytest.raises(ValueError, match="declared torch.float32"):
        w.write("a", torch.ones(3))
    w.write("a", torch.ones(2))
    with pytest.raises(ValueError, match="written twice"):
        w.write("a", torch.ones(2))
    with pytest.raises(ValueError, match="'b' declared but never written"):
        w.close()
    with pytest.raises(ValueError, match="declared twice"):
        SafetensorsWriter(tmp_path / "d.safetensors", [("a", torch.float32, (1,)), ("a", torch.float32, (1,))])


@pytest.mark.parametrize("damage", ["short", "huge_header", "not_json", "bad_offsets"])
def test_reader_rejects_corrupt_files(tmp_path, damage):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(4)}, str(path))
    raw = path.read_bytes()
    if damage == "short":
        raw = raw[:5]
    elif damage == "huge_header":
        raw = struct.pack("<Q", 10**12) + raw[8:]
    elif damage == "not_json":
        raw = raw[:8] + b"{" * (len(raw) - 8)
    else:
        raw = raw[:-4]  # truncated data: the offsets no longer fit
    path.write_bytes(raw)
    with pytest.raises(ValueError, match="x.safetensors"):
        SafetensorsFile(path)


def test_planned_hf_writer_matches_buffered_one(tmp_path):
    tensors = {f"t{i}": torch.full((i + 1, 16), float(i)) for i in range(6)}  # 64 * (i + 1) bytes each
    budget = 64 * 5
    (tmp_path / "planned").mkdir()
    (tmp_path / "buffered").mkdir()
    planned = HFWriter(tmp_path / "planned", budget, plan=_specs(tensors))
    buffered = HFWriter(tmp_path / "buffered", budget)
    for k, t in tensors.items():
        planned.add(k, t)
        buffered.add(k, t)
    planned.close()
    buffered.close()
    idx = [json.loads((tmp_path / d / "model.safetensors.index.json").read_text()) for d in ("planned", "buffered")]
    assert idx[0] == idx[1]
    for name, shard in idx[0]["weight_map"].items():
        with safe_open(str(tmp_path / "planned" / shard), "pt") as f:
            assert torch.equal(f.get_tensor(name), tensors[name])


def test_planned_hf_writer_errors(tmp_path):
    w = HFWriter(tmp_path, 1000, plan=[("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    with pytest.raises(ValueError, match="'c' is not in the HFWriter plan"):
        w.add("c", torch.ones(2))
    w.add("a", torch.ones(2))
    with pytest.raises(ValueError, match="'b' declared but never written"):
        w.close()


def test_plan_shards_gives_oversized_tensors_their_own_shard():
    specs = [("a", torch.float32, (10,)), ("big", torch.float32, (100,)), ("c", torch.float32, (1,))]
    assert [[s[0] for s in shard] for shard in plan_shards(specs, 50)] == [["a"], ["big"], ["c"]]


def test_streamed_shards_load_in_transformers(make_hf, tmp_path):
    """mcore-to-hf's streamed, planned shards (several, with an index) load with transformers'
    from_pretrained and give the original model's logits."""
    transformers = pytest.importorskip("transformers")
    from mindspeed_ckpt.convert import hf_to_mcore, mcore_to_hf

    hf, cfg, tensors = make_hf("llama", std=0.2)
    hf_to_mcore(hf, tmp_path / "mc", tp=2, pp=2)
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    mcore_to_hf(tmp_path / "mc", tmp_path / "back", max_shard_bytes=largest)
    assert len(json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())["weight_map"]) == len(tensors)
    ids = (torch.arange(8) * 5 % cfg["vocab_size"]).unsqueeze(0)
    load = transformers.AutoModelForCausalLM.from_pretrained
    with torch.no_grad():
        ref = load(hf, dtype=torch.float32).eval()(input_ids=ids).logits
        got = load(tmp_path / "back", dtype=torch.float32).eval()(input_ids=ids).logits
    assert ref.std() > 0.05
    assert torch.equal(got, ref)
