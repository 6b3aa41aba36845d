"""The torch-free hf-to-mcore fast path writes what the torch path writes: every rank file of every
architecture and layout, loaded by torch.load (plain, mmap, weights_only), holds the same tensors
(torch.equal, dtype, shape, stride), args, version and iteration as the torch path's file."""

import argparse
import os
import subprocess
import sys

import pytest
import torch

from mindspeed_ckpt import convert, fastpath, fastread
from mindspeed_ckpt.cli import main
from mindspeed_ckpt.megatron_io import chunks
from mindspeed_ckpt.torchfile import NotFast

pytestmark = pytest.mark.slow  # ~15 s: every architecture and layout through both paths

FOUR = {"qwen3_moe": {"num_hidden_layers": 4}, "deepseek_v3": {"num_hidden_layers": 4},
        "deepseek_v3_tied_mtp2": {"num_hidden_layers": 4}}
LAYOUTS = {"tp1pp1": {}, "tp2pp2": {"tp": 2, "pp": 2}, "tp2ep2": {"tp": 2, "ep": 2}, "pp2ep2": {"pp": 2, "ep": 2},
           "tp2pp2vpp": {"tp": 2, "pp": 2, "vpp": 2, "num_hidden_layers": 4},
           "pp2uneven": {"pp": 2, "num_layer_list": "1,3", "num_hidden_layers": 4}}
DENSE = [("llama", "tp1pp1"), ("llama", "tp2pp2"), ("llama", "tp2pp2vpp"), ("qwen2", "tp2pp2"), ("qwen3", "tp2pp2"),
         ("llama", "pp2uneven")]
MOE = [(a, k) for a in ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"] for k in ["tp2pp2", "tp2ep2"]]
CASES = DENSE + MOE + [("deepseek_v3", "pp2ep2"), ("deepseek_v3_tied_mtp2", "pp2ep2")]


def _load(path, **kw):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", **kw)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _assert_same_rank_file(fast_path, ref_path):
    ref = _load(ref_path)
    for kw in ({}, {"mmap": True}, {"mmap": True, "weights_only": True}):
        got = _load(fast_path, **kw)
        assert list(got) == list(ref)
        assert (got["checkpoint_version"], got["iteration"]) == (ref["checkpoint_version"], ref["iteration"])
        assert vars(got["args"]) == vars(ref["args"])
        for a, b in zip(chunks(got), chunks(ref), strict=True):
            assert list(a) == list(b)
            for name, t in b.items():
                u = a[name]
                assert (u.dtype, u.shape, u.stride()) == (t.dtype, t.shape, t.stride()), name
                assert torch.equal(u, t), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch,layout", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_fast_path_equals_torch_path(make_hf, tmp_path, arch, layout, dtype):
    flags = dict(LAYOUTS[layout])
    layers = {"num_hidden_layers": flags.pop("num_hidden_layers")} if "num_hidden_layers" in flags else FOUR.get(arch, {})
    hf, _, _ = make_hf(arch, dtype, shard_bytes=20_000, **layers)  # several shards: pieces span files
    fastpath.hf_to_mcore(hf, tmp_path / "fast", **flags)
    convert.hf_to_mcore(hf, tmp_path / "ref", **flags)
    assert _files(tmp_path / "fast") == _files(tmp_path / "ref")
    for rel in _files(tmp_path / "ref"):
        if rel.name == "model_optim_rng.pt":
            _assert_same_rank_file(tmp_path / "fast" / rel, tmp_path / "ref" / rel)
        else:
            assert (tmp_path / "fast" / rel).read_bytes() == (tmp_path / "ref" / rel).read_bytes()


def test_dtype_cast_is_not_fast_but_the_cli_falls_back(make_hf, tmp_path):
    hf, _, tensors = make_hf("llama")
    with pytest.raises(NotFast):
        fastpath.hf_to_mcore(hf, tmp_path / "x", dtype="bf16")
    assert not (tmp_path / "x").exists()
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--dtype", "bf16"]) == 0
    sd = _load(tmp_path / "mc" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt")["model"]
    emb = sd["embedding.word_embeddings.weight"]
    assert emb.dtype == torch.bfloat16 and torch.equal(emb[:96], tensors["model.embed_tokens.weight"].to(torch.bfloat16))


def test_same_dtype_flag_stays_fast(make_hf, tmp_path):
    hf, _, _ = make_hf("llama", torch.bfloat16)
    fastpath.hf_to_mcore(hf, tmp_path / "mc", dtype="bf16", tp=2)  # no cast: no NotFast
    assert _load(tmp_path / "mc" / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt")["args"].bf16


def test_errors_match_the_torch_path(make_hf, tmp_path):
    hf, _, _ = make_hf("llama")
    for flags in ({"tp": 3}, {"pp": 3}, {"ep": 2}):
        with pytest.raises(ValueError) as fast:
            fastpath.hf_to_mcore(hf, tmp_path / "a", **flags)
        with pytest.raises(ValueError) as ref:
            convert.hf_to_mcore(hf, tmp_path / "b", **flags)
        assert str(fast.value) == str(ref.value)
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "c")]) == 2


def test_tied_head_that_differs_is_refused(make_hf, tmp_path):
    from mindspeed_ckpt.hf_io import HFReader, save_hf

    hf, cfg, tensors = make_hf("qwen2")
    r = HFReader(hf)
    all_t = {n: r.get(n) for n in r.names}
    save_hf(tmp_path / "tied", cfg, {**all_t, "lm_head.weight": all_t["model.embed_tokens.weight"] + 1})
    with pytest.raises(ValueError, match="differs from the tensor megatron shares"):
        fastpath.hf_to_mcore(tmp_path / "tied", tmp_path / "mc")
    save_hf(tmp_path / "same", cfg, {**all_t, "lm_head.weight": all_t["model.embed_tokens.weight"].clone()})
    fastpath.hf_to_mcore(tmp_path / "same", tmp_path / "mc2", tp=2)


def test_cli_fast_path_imports_no_torch(make_hf, tmp_path):
    hf, _, tensors = make_hf("llama", torch.bfloat16)
    code = ("import sys; from mindspeed_ckpt.cli import main; rc = main(sys.argv[1:]); "
            "bad = [m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules]; "
            "print('HEAVY', bad); sys.exit(rc or bool(bad))")
    for argv in (["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--tp", "2", "--pp", "2"],
                 ["mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "back")]):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                             env={**os.environ, "MINDSPEED_CKPT_FAST": "1"})
        assert out.returncode == 0, out.stdout + out.stderr
        assert "HEAVY []" in out.stdout
    from safetensors.torch import load_file

    back = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch,layout", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_fast_read_equals_torch_path(make_hf, tmp_path, arch, layout, dtype):
    """mcore-to-hf by byte copies writes the torch path's files byte for byte (sharded output too)."""
    flags = dict(LAYOUTS[layout])
    layers = {"num_hidden_layers": flags.pop("num_hidden_layers")} if "num_hidden_layers" in flags else FOUR.get(arch, {})
    hf, _, tensors = make_hf(arch, dtype, **layers)
    convert.hf_to_mcore(hf, tmp_path / "mc", **flags)  # rank files written by torch's own zip writer
    for shard in (None, 30_000):
        kw = {"max_shard_bytes": shard} if shard else {}
        fastread.mcore_to_hf(tmp_path / "mc", tmp_path / f"fast{shard}", **kw)
        convert.mcore_to_hf(tmp_path / "mc", tmp_path / f"ref{shard}", **kw)
        assert _files(tmp_path / f"fast{shard}") == _files(tmp_path / f"ref{shard}")
        for rel in _files(tmp_path / f"ref{shard}"):
            assert (tmp_path / f"fast{shard}" / rel).read_bytes() == (tmp_path / f"ref{shard}" / rel).read_bytes(), rel


def test_fast_read_of_torch_save_files_and_fallbacks(make_hf, tmp_path):
    hf, _, tensors = make_hf("llama")
    convert.hf_to_mcore(hf, tmp_path / "mc", tp=2)
    # re-save one rank file with torch.save itself: a view into a larger storage (offset != 0) stays fast
    f = tmp_path / "mc" / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    ck = _load(f)
    big = torch.cat([torch.zeros(7), ck["model"]["decoder.final_layernorm.weight"]])
    ck["model"]["decoder.final_layernorm.weight"] = big[7:]
    torch.save(ck, f)
    fastread.mcore_to_hf(tmp_path / "mc", tmp_path / "fast")
    convert.mcore_to_hf(tmp_path / "mc", tmp_path / "ref")
    assert (tmp_path / "fast" / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    # a transposed (non-contiguous) tensor: NotFast, and the CLI's torch path converts it
    fc2 = "decoder.layers.0.mlp.linear_fc2.weight"
    ck["model"][fc2] = ck["model"][fc2].t().contiguous().t()
    torch.save(ck, f)
    with pytest.raises(NotFast):
        fastread.mcore_to_hf(tmp_path / "mc", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert main(["mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "cli")]) == 0


def test_fast_read_errors_match_the_torch_path(make_hf, tmp_path):
    hf, _, _ = make_hf("llama")
    convert.hf_to_mcore(hf, tmp_path / "mc", tp=2)
    f = tmp_path / "mc" / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    ck = _load(f)
    ck["model"]["decoder.final_layernorm.weight"] = ck["model"]["decoder.final_layernorm.weight"] + 1
    torch.save(ck, f)
    with pytest.raises(ValueError) as fast:
        fastread.mcore_to_hf(tmp_path / "mc", tmp_path / "a")
    with pytest.raises(ValueError) as ref:
        convert.mcore_to_hf(tmp_path / "mc", tmp_path / "b")
    assert str(fast.value) == str(ref.value) and "differs between rank 0 and rank 1" in str(ref.value)
    f.write_bytes(b"not a zip")
    assert main(["mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "c")]) == 2
