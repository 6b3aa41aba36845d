"""HF -> Megatron legacy -> HF round trips for every TP x PP layout, and the rank files'
contents checked against slices of the HF tensors written out by hand."""

import argparse

import pytest
import torch
from safetensors.torch import load_file

from mindspeed_ckpt import maps
from mindspeed_ckpt.convert import hf_to_mcore, mcore_to_hf
from mindspeed_ckpt.hf_io import HFReader, save_hf
from mindspeed_ckpt.megatron_io import load_file as load_rank
from mindspeed_ckpt.megatron_io import locate

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def _read_all(d):
    r = HFReader(d)
    return {n: r.get(n) for n in r.names}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_round_trip_is_bit_identical(make_hf, tmp_path, arch, tp, pp, dtype):
    hf, cfg, tensors = make_hf(arch, dtype, shard_bytes=20_000 if tp == 2 else None)
    assert (hf / "model.safetensors.index.json").exists() == (tp == 2)
    hf_to_mcore(hf, tmp_path / "mc", tp=tp, pp=pp)
    ck = locate(tmp_path / "mc")
    assert (ck.tp, ck.pp) == (tp, pp)
    mcore_to_hf(tmp_path / "mc", tmp_path / "back", max_shard_bytes=30_000 if pp == 2 else 2**30)
    assert (tmp_path / "back" / "model.safetensors.index.json").exists() == (pp == 2)
    back = _read_all(tmp_path / "back")
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == dtype and torch.equal(back[name], t), name
    assert (tmp_path / "back" / "tokenizer.json").read_text() == (hf / "tokenizer.json").read_text()
    assert (tmp_path / "back" / "config.json").read_text() == (hf / "config.json").read_text()


def test_tp2_rank_files_hold_the_expected_slices(make_hf, tmp_path):
    hf, cfg, t = make_hf("llama")
    hf_to_mcore(hf, tmp_path / "mc", tp=2, pp=1)
    step = tmp_path / "mc" / "iter_0000001"
    assert (tmp_path / "mc" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert sorted(p.name for p in step.iterdir()) == ["mp_rank_00", "mp_rank_01"]
    ranks = [load_rank(step / f"mp_rank_0{r}" / "model_optim_rng.pt") for r in range(2)]
    hd, L = 8, "model.layers.1."
    for r, ck in enumerate(ranks):
        sd = ck["model"]
        assert ck["checkpoint_version"] == 3.0 and ck["iteration"] == 1
        assert isinstance(ck["args"], argparse.Namespace)
        assert ck["args"].tensor_model_parallel_size == 2 and ck["args"].padded_vocab_size == 256
        # rank r holds query group r: its 2 q heads, then k head r, then v head r
        q, k, v = (t[f"{L}self_attn.{p}_proj.weight"] for p in "qkv")
        expect_qkv = torch.cat([q[r * 2 * hd:(r + 1) * 2 * hd], k[r * hd:(r + 1) * hd], v[r * hd:(r + 1) * hd]])
        assert torch.equal(sd["decoder.layers.1.self_attention.linear_qkv.weight"], expect_qkv)
        o = t[f"{L}self_attn.o_proj.weight"]
        assert torch.equal(sd["decoder.layers.1.self_attention.linear_proj.weight"], o[:, r * 16:(r + 1) * 16])
        gate, up = t[f"{L}mlp.gate_proj.weight"], t[f"{L}mlp.up_proj.weight"]
        assert torch.equal(sd["decoder.layers.1.mlp.linear_fc1.weight"],
                           torch.cat([gate[r * 24:(r + 1) * 24], up[r * 24:(r + 1) * 24]]))
        down = t[f"{L}mlp.down_proj.weight"]
        assert torch.equal(sd["decoder.layers.1.mlp.linear_fc2.weight"], down[:, r * 24:(r + 1) * 24])
        assert torch.equal(sd["decoder.layers.1.input_layernorm.weight"], t[f"{L}input_layernorm.weight"])
        emb = sd["embedding.word_embeddings.weight"]
        assert emb.shape == (128, 32)
    assert torch.equal(ranks[0]["model"]["embedding.word_embeddings.weight"][:96], t["model.embed_tokens.weight"])
    assert not ranks[0]["model"]["embedding.word_embeddings.weight"][96:].any()
    assert not ranks[1]["model"]["embedding.word_embeddings.weight"].any()
    assert torch.equal(ranks[0]["model"]["output_layer.weight"][:96], t["lm_head.weight"])


def test_pp2_stages_renumber_layers_and_split_ends(make_hf, tmp_path):
    hf, cfg, t = make_hf("qwen2")  # tied embeddings: the last stage keeps its own output_layer copy
    hf_to_mcore(hf, tmp_path / "mc", tp=1, pp=2, make_vocab_size_divisible_by=1)
    step = tmp_path / "mc" / "iter_0000001"
    assert sorted(p.name for p in step.iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    first, last = (load_rank(step / f"mp_rank_00_00{s}" / "model_optim_rng.pt")["model"] for s in range(2))
    assert "embedding.word_embeddings.weight" in first and "decoder.final_layernorm.weight" not in first
    assert "embedding.word_embeddings.weight" not in last and "decoder.final_layernorm.weight" in last
    assert {k.split(".")[2] for k in first if k.startswith("decoder.layers.")} == {"0"}
    assert {k.split(".")[2] for k in last if k.startswith("decoder.layers.")} == {"0"}
    assert torch.equal(last["decoder.layers.0.input_layernorm.weight"], t["model.layers.1.input_layernorm.weight"])
    assert torch.equal(last["output_layer.weight"], t["model.embed_tokens.weight"])
    assert "output_layer.weight" not in first
    assert "lm_head.weight" not in load_file(str(mcore_to_hf(tmp_path / "mc", tmp_path / "back") / "model.safetensors"))


def test_dtype_cast_and_hf_config_override(make_hf, tmp_path):
    hf, cfg, t = make_hf("qwen3")
    hf_to_mcore(hf, tmp_path / "mc", dtype="bf16")
    ck = load_rank(tmp_path / "mc" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt")
    assert ck["args"].bf16 and ck["args"].params_dtype == torch.bfloat16
    assert all(v.dtype == torch.bfloat16 for v in ck["model"].values())
    mcore_to_hf(tmp_path / "mc", tmp_path / "back", hf_config=hf)
    back = _read_all(tmp_path / "back")
    assert all(torch.equal(back[n], t[n].to(torch.bfloat16)) for n in t)


def test_failure_leaves_no_output(make_hf, tmp_path):
    hf, cfg, t = make_hf("llama")
    (hf / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        hf_to_mcore(hf, tmp_path / "mc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_overwrite_replaces_existing_output(make_hf, tmp_path):
    hf, cfg, t = make_hf("llama")
    (tmp_path / "mc").mkdir()
    (tmp_path / "mc" / "stale").write_text("x")
    with pytest.raises(ValueError, match="already exists"):
        hf_to_mcore(hf, tmp_path / "mc")
    hf_to_mcore(hf, tmp_path / "mc", overwrite=True, tp=2)
    assert not (tmp_path / "mc" / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "mc"]


def test_attention_and_mlp_bias_must_agree(tmp_path):
    cfg = {"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 4, "mlp_bias": True}
    save_hf(tmp_path / "hf", cfg, {n: torch.zeros(s) for r in maps.rules(cfg) for n, s in zip(r.hf, r.hf_shapes, strict=True)})
    with pytest.raises(NotImplementedError, match="add_bias_linear"):
        hf_to_mcore(tmp_path / "hf", tmp_path / "mc")
