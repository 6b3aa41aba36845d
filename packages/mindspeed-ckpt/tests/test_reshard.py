"""`mindspeed convert reshard`: legacy -> legacy in another layout. Round trips through HF are
bit-identical, and a resharded checkpoint holds exactly what hf_to_mcore writes for the target
layout directly (rank file by rank file)."""

import pytest
import torch

from mindspeed_ckpt.cli import main
from mindspeed_ckpt.convert import hf_to_mcore, mcore_to_hf
from mindspeed_ckpt.hf_io import HFReader
from mindspeed_ckpt.megatron_io import chunks, load_file, locate
from mindspeed_ckpt.reshard import reshard

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _hf_equal(d, tensors, dtype):
    r = HFReader(d)
    assert sorted(r.names) == sorted(tensors)
    for name, t in tensors.items():
        got = r.get(name)
        assert got.dtype == dtype and torch.equal(got, t), name


def _rank_files_equal(a, b):
    ca, cb = locate(a), locate(b)
    assert (ca.tp, ca.pp, ca.ep) == (cb.tp, cb.pp, cb.ep)
    for t in range(ca.tp):
        for p in range(ca.pp):
            for e in range(ca.ep):
                fa, fb = load_file(ca.path(t, p, e)), load_file(cb.path(t, p, e))
                for ma, mb in zip(chunks(fa), chunks(fb), strict=True):
                    assert sorted(ma) == sorted(mb)
                    for k in ma:
                        assert ma[k].dtype == mb[k].dtype and torch.equal(ma[k], mb[k]), (t, p, e, k)
                assert vars(fa["args"]) == vars(fb["args"])


# (arch, config overrides, source layout, target layout)
CASES = {
    "llama-tp2pp2-to-tp1pp4": ("llama", {"num_hidden_layers": 4}, {"tp": 2, "pp": 2}, {"pp": 4}),
    "qwen2tied-tp2-to-pp2vpp2": ("qwen2", {"num_hidden_layers": 4}, {"tp": 2}, {"pp": 2, "vpp": 2}),
    "qwen3-uneven-to-tp2": ("qwen3", {"num_hidden_layers": 4}, {"pp": 2, "num_layer_list": "1,3"}, {"tp": 2}),
    "qwen3moe-tp2ep2-to-pp2": ("qwen3_moe", {"num_hidden_layers": 4}, {"tp": 2, "ep": 2}, {"pp": 2}),
    "dsv3mtp-pp2ep2-to-tp2": ("deepseek_v3", {"num_hidden_layers": 4}, {"pp": 2, "ep": 2}, {"tp": 2}),
    "dsv3tiedmtp-tp2-to-pp2ep4": ("deepseek_v3_tied_mtp2", {"num_hidden_layers": 4}, {"tp": 2}, {"pp": 2, "ep": 4,
                                                                                              "num_layer_list": "3,1"}),
}


@DTYPES
@pytest.mark.parametrize("case", list(CASES))
def test_reshard_round_trip_bit_identical(make_hf, tmp_path, case, dtype):
    arch, over, src, dst = CASES[case]
    hf, _, tensors = make_hf(arch, dtype, **over)
    hf_to_mcore(hf, tmp_path / "a", **src)
    reshard(tmp_path / "a", tmp_path / "b", **dst)
    ck = locate(tmp_path / "b")
    assert (ck.tp, ck.pp, ck.ep) == (dst.get("tp", 1), dst.get("pp", 1), dst.get("ep", 1))
    mcore_to_hf(tmp_path / "b", tmp_path / "back")
    _hf_equal(tmp_path / "back", tensors, dtype)
    # the resharded files are exactly what a direct conversion to the target layout writes
    hf_to_mcore(hf, tmp_path / "direct", **dst)
    _rank_files_equal(tmp_path / "b", tmp_path / "direct")
    assert (tmp_path / "b" / "hf_config" / "tokenizer.json").is_file()


def test_reshard_dtype_cast_and_overwrite(make_hf, tmp_path):
    hf, _, tensors = make_hf("llama")
    hf_to_mcore(hf, tmp_path / "a", tp=2)
    reshard(tmp_path / "a", tmp_path / "b", pp=2, dtype="bf16")
    with pytest.raises(ValueError, match="--overwrite"):
        reshard(tmp_path / "a", tmp_path / "b", pp=2)
    reshard(tmp_path / "a", tmp_path / "b", tp=2, overwrite=True, dtype="bf16")
    mcore_to_hf(tmp_path / "b", tmp_path / "back")
    _hf_equal(tmp_path / "back", {k: v.to(torch.bfloat16) for k, v in tensors.items()}, torch.bfloat16)


def test_reshard_cli_round_trip(make_hf, tmp_path):
    hf, _, tensors = make_hf("mixtral")
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "a"), "--tp", "2", "--ep", "2"]) == 0
    assert main(["reshard", "--mcore-dir", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--tp", "1", "--pp", "2",
                 "--ep", "4"]) == 0
    assert main(["mcore-to-hf", "--mcore-dir", str(tmp_path / "b"), "--out", str(tmp_path / "back")]) == 0
    _hf_equal(tmp_path / "back", tensors, torch.float32)


@pytest.mark.parametrize("flags,needle", [
    (["--tp", "3"], "num_attention_heads=4"),
    (["--pp", "3"], "--pp 3"),
    (["--ep", "2"], "--ep 2"),
    (["--pp", "2", "--vpp", "2"], "--vpp 2"),
    (["--num-layer-list", "2,1", "--pp", "2"], "--num-layer-list"),
    (["--dtype", "fp8"], "--dtype"),
])
def test_reshard_bad_flags_exit_2_one_line(make_hf, tmp_path, capsys, flags, needle):
    hf, _, _ = make_hf("llama")
    hf_to_mcore(hf, tmp_path / "a")
    capsys.readouterr()
    assert main(["reshard", "--mcore-dir", str(tmp_path / "a"), "--out", str(tmp_path / "b"), *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and needle in err, err
    assert not (tmp_path / "b").exists()


def test_reshard_refuses_unexpected_tensor_and_same_dir(make_hf, tmp_path, capsys):
    hf, _, _ = make_hf("llama")
    hf_to_mcore(hf, tmp_path / "a")
    path = locate(tmp_path / "a").path(0, 0)
    ck = torch.load(path, weights_only=False)  # not memory-mapped: the file is rewritten below
    ck["model"]["decoder.layers.0.self_attention.linear_qkv.lora_A.weight"] = torch.zeros(2, 32)
    torch.save(ck, path)
    capsys.readouterr()
    assert main(["reshard", "--mcore-dir", str(tmp_path / "a"), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "unexpected tensor" in err and "lora_A" in err and "--lora-dir" in err and len(err.strip().splitlines()) == 1
    assert main(["reshard", "--mcore-dir", str(tmp_path / "a"), "--out", str(tmp_path / "a"), "--overwrite"]) == 2
    assert "is the input" in capsys.readouterr().err


def test_get_maps_only_the_owning_stage(make_hf, tmp_path, monkeypatch):
    from mindspeed_ckpt.megatron_io import LegacyCheckpoint
    from mindspeed_ckpt.reader import read_mcore

    hf, _, tensors = make_hf("qwen3_moe", num_hidden_layers=4)
    hf_to_mcore(hf, tmp_path / "a", tp=2, pp=2, ep=2)
    ck = read_mcore(tmp_path / "a")
    loads = []
    real = LegacyCheckpoint.load
    monkeypatch.setattr(LegacyCheckpoint, "load", lambda self, t, p, e=0: loads.append((t, p, e)) or real(self, t, p, e))
    up = ck.get("decoder.layers.3.mlp.experts.local_experts.3.linear_fc1.weight")
    assert torch.equal(up, torch.cat([tensors["model.layers.3.mlp.experts.3.gate_proj.weight"],
                                      tensors["model.layers.3.mlp.experts.3.up_proj.weight"]]))
    assert sorted(loads) == [(t, 1, e) for t in range(2) for e in range(2)]  # stage 1's TP x EP files only
    ck.get("decoder.layers.2.self_attention.linear_qkv.weight")  # same stage: still mapped, nothing loaded
    assert len(loads) == 4
