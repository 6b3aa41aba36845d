"""``read_mcore``: any legacy layout read back as the full TP1 PP1 EP1 state dict that
``maps.hf_to_mcore`` makes from the same HF tensors, one pipeline stage at a time."""

import shutil

import pytest
import torch

import mindspeed_ckpt
from mindspeed_ckpt import maps
from mindspeed_ckpt.convert import hf_to_mcore
from mindspeed_ckpt.megatron_io import LegacyCheckpoint

CASES = [
    ("qwen2", {}, {"tp": 2, "pp": 2}),  # tied: the last stage's output_layer copy is not yielded
    ("qwen3_moe", {"num_hidden_layers": 4}, {"tp": 2, "ep": 2, "pp": 2, "num_layer_list": "3,1"}),
    ("deepseek_v3_tied_mtp2", {"num_hidden_layers": 4}, {"pp": 2, "vpp": 2, "ep": 2}),
    ("deepseek_v2", {}, {"tp": 2}),
]


@pytest.mark.parametrize("arch,overrides,flags", CASES, ids=[c[0] for c in CASES])
def test_tensors_equal_the_maps_full_state_dict(make_hf, tmp_path, arch, overrides, flags):
    hf, cfg, t = make_hf(arch, **overrides)
    hf_to_mcore(hf, tmp_path / "mc", **flags)
    ck = mindspeed_ckpt.read_mcore(tmp_path / "mc")
    assert ck.hf_config == cfg and (ck.tp, ck.pp, ck.ep) == (flags.get("tp", 1), flags.get("pp", 1), flags.get("ep", 1))
    expected = maps.hf_to_mcore(cfg, t, padded_vocab_size=ck.padded_vocab_size)
    got = dict(ck.tensors())
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert ck.names() == list(got)


def test_reads_one_stage_at_a_time_in_order(make_hf, tmp_path, monkeypatch):
    hf, cfg, t = make_hf("mixtral")
    hf_to_mcore(hf, tmp_path / "mc", tp=2, pp=2, ep=2)
    ck = mindspeed_ckpt.read_mcore(tmp_path / "mc")
    loads = []
    real = LegacyCheckpoint.load
    monkeypatch.setattr(LegacyCheckpoint, "load", lambda self, t, p, e=0: loads.append(p) or real(self, t, p, e))
    stream = ck.tensors()
    first_name, _ = next(stream)
    assert first_name == "embedding.word_embeddings.weight" and loads == [0] * 4  # stage 0's TP x EP files only
    names = [first_name] + [n for n, _ in stream]
    assert loads == [0] * 4 + [1] * 4
    layer_order = [int(n.split(".")[2]) for n in names if n.startswith("decoder.layers.")]
    assert layer_order == sorted(layer_order)


def test_hf_config_override_and_errors(make_hf, tmp_path):
    hf, cfg, t = make_hf("llama")
    hf_to_mcore(hf, tmp_path / "mc")
    shutil.rmtree(tmp_path / "mc" / "hf_config")
    with pytest.raises(ValueError, match="--hf-config"):
        mindspeed_ckpt.read_mcore(tmp_path / "mc")
    assert mindspeed_ckpt.read_mcore(tmp_path / "mc", hf_config=hf).hf_config == cfg
    other, _, _ = make_hf("llama", name="other", num_hidden_layers=4)
    with pytest.raises(ValueError, match="num_layers=2"):
        mindspeed_ckpt.read_mcore(tmp_path / "mc", hf_config=other)
