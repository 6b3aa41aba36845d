"""HF directory reading (single file, sharded with index) and sharded writing."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mindspeed_ckpt.hf_io import HFReader, save_hf

CFG = {"model_type": "llama"}


def test_sharded_write_and_read(tmp_path):
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    save_hf(tmp_path / "d", CFG, tensors, max_shard_bytes=100)
    index = json.loads((tmp_path / "d" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["metadata"]["total_size"] == 200
    r = HFReader(tmp_path / "d")
    assert sorted(r.names) == sorted(tensors) and all(torch.equal(r.get(n), t) for n, t in tensors.items())
    assert not list((tmp_path / "d").glob("*.partial"))


def test_single_file(tmp_path):
    save_hf(tmp_path / "d", CFG, {"a": torch.ones(2)})
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(KeyError):
        HFReader(tmp_path / "d").get("b")


def test_index_naming_a_missing_shard(tmp_path):
    d = tmp_path / "d"
    save_hf(d, CFG, {"a": torch.ones(2), "b": torch.ones(2)}, max_shard_bytes=8)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        HFReader(d)


def test_bad_config_and_missing_weights(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        HFReader(d)
    (d / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither model.safetensors"):
        HFReader(d)
    save_file({"a": torch.ones(2)}, str(d / "model.safetensors"))
    assert HFReader(d).names == ["a"]
