"""--noop-layers (MindSpeed's weightless pass-through layers that pad the layer count for an even PP split).

A 3-layer model with noop layer 3 is a 4-layer megatron model split 2 + 2: model layer i is megatron
layer i (none of them noop here), stage 1 holds megatron layers 2 (real, HF layer 2) and 3 (noop, no
tensors); with noop layer 1, HF layers 1 and 2 are megatron layers 2 and 3. Round trips through both
conversion paths (torch and the byte-copy fast path), reshard and read_mcore must be bit-identical.
"""

from __future__ import annotations

import pytest
import torch

from mindspeed_ckpt import read_mcore
from mindspeed_ckpt.cli import main
from mindspeed_ckpt.hf_io import HFReader
from mindspeed_ckpt.megatron_io import args_get, chunks, locate


def _rank_layers(mcore) -> dict[int, set[int]]:
    """Per PP stage, the local decoder-layer indices present in TP rank 0's file."""
    ck = locate(mcore)
    out = {}
    for stage in range(ck.pp):
        names = chunks(ck.load(0, stage))[0]
        out[stage] = {int(n.split(".")[2]) for n in names if n.startswith("decoder.layers.")}
    return out


@pytest.mark.parametrize("fast", ["1", "0"])
@pytest.mark.parametrize(("noop", "stage_layers"), [("3", {0: {0, 1}, 1: {0}}), ("1", {0: {0}, 1: {0, 1}})])
def test_noop_layers_round_trip(make_hf, tmp_path, capsys, monkeypatch, fast, noop, stage_layers):
    monkeypatch.setattr("mindspeed_ckpt.cli.FAST", fast == "1")  # the byte-copy fast path or the torch path
    hf, cfg, tensors = make_hf("qwen3", num_hidden_layers=3)
    mc = tmp_path / "mc"
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(mc), "--pp", "2", "--noop-layers", noop]) == 0
    args = locate(mc).load(0, 0)["args"]
    assert args_get(args, "num_layers") == 4 and args_get(args, "noop_layers") == noop
    assert _rank_layers(mc) == stage_layers
    ck = read_mcore(mc)
    got = dict(ck.tensors())
    assert max(int(n.split(".")[2]) for n in got if n.startswith("decoder.layers.")) == 2  # HF numbering
    assert main(["mcore-to-hf", "--mcore-dir", str(mc), "--out", str(tmp_path / "back")]) == 0
    back = HFReader(tmp_path / "back")
    assert set(back.names) == set(tensors) and all(torch.equal(back.get(n), tensors[n]) for n in tensors)
    # reshard away from the padding and back to HF: still bit-identical
    assert main(["reshard", "--mcore-dir", str(mc), "--out", str(tmp_path / "flat"), "--tp", "2"]) == 0
    assert main(["mcore-to-hf", "--mcore-dir", str(tmp_path / "flat"), "--out", str(tmp_path / "back2")]) == 0
    back2 = HFReader(tmp_path / "back2")
    assert all(torch.equal(back2.get(n), tensors[n]) for n in tensors)


@pytest.mark.parametrize(("noop", "needle"), [("7", "--noop-layers 7"), ("1,1", "--noop-layers 1,1"), ("x", "--noop-layers")])
def test_bad_noop_layers_exit_2(make_hf, tmp_path, capsys, noop, needle):
    hf, _, _ = make_hf("qwen3", num_hidden_layers=3)
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--pp", "2", "--noop-layers", noop]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and err.count("\n") == 1, err
