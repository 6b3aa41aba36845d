"""MoE / MLA / MTP architectures through every parallel layout: HF -> Megatron legacy -> HF
round trips bit-identical (same names, torch.equal, same dtype), and the rank files' expert,
MTP and chunk contents checked against the HF tensors by hand."""

import pytest
import torch

from mindspeed_ckpt.convert import hf_to_mcore, mcore_to_hf
from mindspeed_ckpt.hf_io import HFReader
from mindspeed_ckpt.megatron_io import chunks, load_file, locate

# 4 decoder layers wherever a config has 3, so PP 2 splits evenly
FOUR = {"qwen3_moe": {"num_hidden_layers": 4}, "deepseek_v3": {"num_hidden_layers": 4},
        "deepseek_v3_tied_mtp2": {"num_hidden_layers": 4}}
MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]
LAYOUTS = {"tp1pp1": {}, "tp2pp2": {"tp": 2, "pp": 2}, "tp2ep2": {"tp": 2, "ep": 2}}
CASES = [(a, k) for a in MOE for k in LAYOUTS] + [("deepseek_v3", "pp2ep2"), ("deepseek_v3_tied_mtp2", "pp2ep2")]
LAYOUTS["pp2ep2"] = {"pp": 2, "ep": 2}


def _read_all(d):
    r = HFReader(d)
    return {n: r.get(n) for n in r.names}


def _round_trip(make_hf, tmp_path, arch, dtype, **flags):
    hf, cfg, tensors = make_hf(arch, dtype, **FOUR.get(arch, {}))
    hf_to_mcore(hf, tmp_path / "mc", **flags)
    mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    back = _read_all(tmp_path / "back")
    assert sorted(back) == sorted(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == dtype and torch.equal(back[name], t), name
    return cfg, tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch,layout", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_round_trip_is_bit_identical(make_hf, tmp_path, arch, layout, dtype):
    flags = LAYOUTS[layout]
    _round_trip(make_hf, tmp_path, arch, dtype, **flags)
    ck = locate(tmp_path / "mc")
    assert (ck.tp, ck.pp, ck.ep) == (flags.get("tp", 1), flags.get("pp", 1), flags.get("ep", 1))


def _rank(mc, name):
    return load_file(mc / "iter_0000001" / name / "model_optim_rng.pt")


def test_ep_ranks_hold_their_experts_renumbered(make_hf, tmp_path):
    hf, cfg, t = make_hf("qwen3_moe", **FOUR["qwen3_moe"])
    hf_to_mcore(hf, tmp_path / "mc", tp=2, ep=2)
    step = tmp_path / "mc" / "iter_0000001"
    # PP = 1: megatron appends the EP rank straight after the TP rank
    assert sorted(p.name for p in step.iterdir()) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    ck = _rank(tmp_path / "mc", "mp_rank_01_001")
    sd, args = ck["model"], ck["args"]
    assert args.num_experts == 4 and args.expert_model_parallel_size == 2 and args.expert_tensor_parallel_size == 1
    assert args.moe_layer_freq == [1, 0, 1, 1] and args.moe_router_topk == 2 and args.moe_ffn_hidden_size == 16
    experts = {k.split(".")[6] for k in sd if ".local_experts." in k}
    assert experts == {"0", "1"}
    # EP rank 1, local expert 1 = global expert 3, whole (expert TP = 1) although TP = 2
    gate, up = t["model.layers.2.mlp.experts.3.gate_proj.weight"], t["model.layers.2.mlp.experts.3.up_proj.weight"]
    assert torch.equal(sd["decoder.layers.2.mlp.experts.local_experts.1.linear_fc1.weight"], torch.cat([gate, up]))
    assert torch.equal(sd["decoder.layers.2.mlp.router.weight"], t["model.layers.2.mlp.gate.weight"])  # replicated
    # attention still TP-split: TP rank 1 holds query group 1
    qkv = sd["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape[0] == (2 + 1 + 1) * 8
    assert torch.equal(qkv[-8:], t["model.layers.0.self_attn.v_proj.weight"][8:])


def test_mla_projections_split_by_rows_norms_replicated(make_hf, tmp_path):
    hf, cfg, t = make_hf("deepseek_v3", **FOUR["deepseek_v3"])
    hf_to_mcore(hf, tmp_path / "mc", tp=2)
    sd = _rank(tmp_path / "mc", "mp_rank_01")["model"]
    a = "decoder.layers.1.self_attention."
    h = "model.layers.1.self_attn."
    assert torch.equal(sd[a + "linear_q_down_proj.weight"], t[h + "q_a_proj.weight"][8:])  # q_lora 16 / 2
    assert torch.equal(sd[a + "linear_kv_down_proj.weight"], t[h + "kv_a_proj_with_mqa.weight"][6:])  # (8 + 4) / 2
    assert torch.equal(sd[a + "linear_kv_up_proj.weight"], t[h + "kv_b_proj.weight"][32:])  # heads 2-3 of 4
    assert torch.equal(sd[a + "linear_proj.weight"], t[h + "o_proj.weight"][:, 16:])
    assert torch.equal(sd[a + "kv_layernorm.weight"], t[h + "kv_a_layernorm.weight"])
    assert torch.equal(sd["mtp.layers.0.eh_proj.weight"], t["model.layers.4.eh_proj.weight"][16:])
    args = _rank(tmp_path / "mc", "mp_rank_00")["args"]
    assert args.multi_latent_attention and args.q_lora_rank == 16 and args.kv_lora_rank == 8 and args.qk_layernorm
    assert args.mtp_num_layers == 1 and args.moe_router_enable_expert_bias and args.moe_shared_expert_intermediate_size == 16


def test_mtp_lives_on_the_last_stage_with_an_embedding_copy(make_hf, tmp_path):
    hf, cfg, t = make_hf("deepseek_v3_tied_mtp2", **FOUR["deepseek_v3_tied_mtp2"])
    hf_to_mcore(hf, tmp_path / "mc", pp=2, ep=2, make_vocab_size_divisible_by=1)
    first, last = (_rank(tmp_path / "mc", f"mp_rank_00_00{s}_001")["model"] for s in range(2))
    assert not any(k.startswith("mtp.") for k in first)
    assert {k.split(".")[2] for k in last if k.startswith("mtp.")} == {"0", "1"}
    emb = t["model.embed_tokens.weight"]
    # megatron's MTP block embeds tokens on the last stage; tied: the output layer is a copy too
    assert torch.equal(first["embedding.word_embeddings.weight"], emb)
    assert torch.equal(last["embedding.word_embeddings.weight"], emb) and torch.equal(last["output_layer.weight"], emb)
    name = "mtp.layers.1.transformer_layer.mlp.experts.local_experts.0.linear_fc2.weight"
    assert torch.equal(last[name], t["model.layers.5.mlp.experts.2.down_proj.weight"])


@pytest.mark.parametrize("arch,flags,counts", [
    ("qwen3_moe", {"pp": 2, "num_layer_list": "1,3"}, [1, 3]),
    ("qwen3_moe", {"pp": 2, "decoder_first_pipeline_num_layers": 3, "tp": 2}, [3, 1]),
    ("deepseek_v3", {"pp": 2, "decoder_last_pipeline_num_layers": 1, "ep": 2}, [3, 1]),
], ids=["list-1,3", "first3-tp2", "last1-mtp-ep2"])
def test_uneven_pp_round_trip_needs_no_flag_back(make_hf, tmp_path, arch, flags, counts):
    _round_trip(make_hf, tmp_path, arch, torch.float32, **flags)
    suffix = "_000" if flags.get("ep", 1) > 1 else ""
    stages = [_rank(tmp_path / "mc", f"mp_rank_00_00{s}{suffix}") for s in range(2)]
    assert [len({k.split(".")[2] for k in s["model"] if k.startswith("decoder.layers.")}) for s in stages] == counts
    a = vars(stages[0]["args"])
    for key in ("num_layer_list", "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
        assert a[key] == flags.get(key), key


@pytest.mark.parametrize("arch,flags", [
    ("llama", {"pp": 2, "vpp": 2, "num_hidden_layers": 8}),
    ("deepseek_v3", {"pp": 2, "vpp": 2, "ep": 2, "tp": 2}),
], ids=["llama-pp2vpp2", "deepseek_v3-pp2vpp2ep2tp2"])
def test_vpp_round_trip_and_chunk_contents(make_hf, tmp_path, arch, flags):
    flags = dict(flags)
    overrides = {"num_hidden_layers": flags.pop("num_hidden_layers")} if "num_hidden_layers" in flags else FOUR[arch]
    hf, cfg, t = make_hf(arch, **overrides)
    hf_to_mcore(hf, tmp_path / "mc", **flags)
    mcore_to_hf(tmp_path / "mc", tmp_path / "back")
    back = _read_all(tmp_path / "back")
    assert sorted(back) == sorted(t) and all(torch.equal(back[n], t[n]) for n in t)
    suffix = "_000" if flags.get("ep", 1) > 1 else ""
    ck = _rank(tmp_path / "mc", f"mp_rank_00_000{suffix}")
    assert "model" not in ck and ck["args"].virtual_pipeline_model_parallel_size == 2
    models = chunks(ck)
    n = cfg["num_hidden_layers"] // 4  # layers per chunk
    # stage 0 chunk 1 holds global layers 2n .. 3n-1, renumbered from 0
    assert torch.equal(models[1]["decoder.layers.0.input_layernorm.weight"], t[f"model.layers.{2 * n}.input_layernorm.weight"])
    last = chunks(_rank(tmp_path / "mc", f"mp_rank_00_001{suffix}"))
    assert "decoder.final_layernorm.weight" in last[1] and "decoder.final_layernorm.weight" not in last[0]
    assert any(k.startswith("mtp.") for k in last[1]) == (arch == "deepseek_v3")
