"""LoRA merge on export (`mcore-to-hf --lora-dir`): HF PEFT adapters and Megatron adapters
(TP-sharded next to their base layer) give ``W + alpha / r * B @ A``, checked against that
formula in float64, against PEFT's own ``merge_and_unload`` when peft is installed, and bad
adapters are one-line errors with exit 2."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from mindspeed_ckpt import maps
from mindspeed_ckpt.cli import main
from mindspeed_ckpt.convert import hf_to_mcore, mcore_to_hf
from mindspeed_ckpt.hf_io import HFReader
from mindspeed_ckpt.megatron_io import locate, save_rank, write_tracker
from mindspeed_ckpt.reader import read_mcore
from mindspeed_ckpt.sharding import split_tp, tp_dim

FP32_TOL = dict(atol=1e-5, rtol=1e-5)  # mindspeed_kernels.testing.TOLERANCES[float32]


def _read(d):
    r = HFReader(d)
    return {n: r.get(n) for n in r.names}


def _lora_pair(shape, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, shape[1], generator=g) * 0.5, torch.randn(shape[0], r, generator=g) * 0.5


def _write_peft(d, pairs, r, alpha, dtype=torch.float32, **config):
    """An HF PEFT adapter dir: pairs = {hf module name: (A [r, in], B [out, r])}."""
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted({m.split(".")[-1] for m in pairs}),
           "use_rslora": False, "fan_in_fan_out": False, **config}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = {}
    for module, (a, b) in pairs.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype).contiguous()
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


def _expected(w, a, b, scaling):
    return (w.double() + scaling * (b.double() @ a.double())).to(w.dtype)


def _check_merged(back, base, pairs, scaling):
    assert sorted(back) == sorted(base)
    for name, t in base.items():
        module = name.removesuffix(".weight")
        if module in pairs:
            a, b = pairs[module]
            torch.testing.assert_close(back[name], _expected(t, a, b, scaling), **FP32_TOL)
            assert not torch.equal(back[name], t), name
        else:
            assert torch.equal(back[name], t), name


DENSE_TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.o_proj",
                 "model.layers.1.mlp.gate_proj", "model.layers.2.mlp.up_proj", "model.layers.3.mlp.down_proj"]


def test_peft_adapter_merged_into_dense_tp2pp2(make_hf, tmp_path):
    hf, _, base = make_hf("llama", num_hidden_layers=4)
    hf_to_mcore(hf, tmp_path / "mc", tp=2, pp=2)
    pairs = {m: _lora_pair(base[m + ".weight"].shape, 4, i) for i, m in enumerate(DENSE_TARGETS)}
    _write_peft(tmp_path / "lora", pairs, r=4, alpha=8)
    assert main(["mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "back"),
                 "--lora-dir", str(tmp_path / "lora")]) == 0
    _check_merged(_read(tmp_path / "back"), base, pairs, 8 / 4)


def test_peft_rslora_and_alpha_override(make_hf, tmp_path):
    hf, _, base = make_hf("qwen3")
    hf_to_mcore(hf, tmp_path / "mc", tp=2)
    pairs = {m: _lora_pair(base[m + ".weight"].shape, 4, i) for i, m in enumerate(DENSE_TARGETS[:4])}
    _write_peft(tmp_path / "lora", pairs, r=4, alpha=8, use_rslora=True)
    mcore_to_hf(tmp_path / "mc", tmp_path / "rs", lora_dir=tmp_path / "lora")
    _check_merged(_read(tmp_path / "rs"), base, pairs, 8 / math.sqrt(4))
    mcore_to_hf(tmp_path / "mc", tmp_path / "ov", lora_dir=tmp_path / "lora", lora_alpha=2.0)
    _check_merged(_read(tmp_path / "ov"), base, pairs, 2 / math.sqrt(4))


def test_peft_moe_expert_adapter(make_hf, tmp_path):
    hf, _, base = make_hf("qwen3_moe", num_hidden_layers=4)
    hf_to_mcore(hf, tmp_path / "mc", tp=2, ep=2)
    targets = ["model.layers.0.mlp.experts.3.gate_proj", "model.layers.2.mlp.experts.0.down_proj",
               "model.layers.3.self_attn.k_proj"]
    pairs = {m: _lora_pair(base[m + ".weight"].shape, 2, i) for i, m in enumerate(targets)}
    _write_peft(tmp_path / "lora", pairs, r=2, alpha=4)
    mcore_to_hf(tmp_path / "mc", tmp_path / "back", lora_dir=tmp_path / "lora")
    _check_merged(_read(tmp_path / "back"), base, pairs, 2.0)


def test_peft_bf16_merge_matches_peft_cpu_rounding(make_hf, tmp_path):
    # PEFT on CPU: delta = (B @ A) * scaling in float32, cast to the weight dtype, added there
    hf, _, base = make_hf("llama", torch.bfloat16)
    hf_to_mcore(hf, tmp_path / "mc")
    pairs = {m: _lora_pair(base[m + ".weight"].shape, 4, i) for i, m in enumerate(DENSE_TARGETS[:4])}
    _write_peft(tmp_path / "lora", pairs, r=4, alpha=8, dtype=torch.bfloat16)
    mcore_to_hf(tmp_path / "mc", tmp_path / "back", lora_dir=tmp_path / "lora")
    back = _read(tmp_path / "back")
    for m, (a, b) in pairs.items():
        delta = (b.to(torch.bfloat16).float() @ a.to(torch.bfloat16).float()) * 2.0
        assert back[m + ".weight"].dtype == torch.bfloat16
        assert torch.equal(back[m + ".weight"], base[m + ".weight"] + delta.to(torch.bfloat16)), m


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)],
                         ids=["fp32", "bf16-fp32adapter", "bf16-bf16adapter"])
def test_peft_merge_and_unload_reference(tmp_path, dtype, autocast):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(tmp_path / "hf")
    base = _read(tmp_path / "hf")
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                           init_lora_weights=False)  # random A and B: a non-zero update
    pm = peft.get_peft_model(model, lcfg, autocast_adapter_dtype=autocast)  # True: PEFT keeps adapters in float32
    pm.save_pretrained(tmp_path / "lora")
    merged = {k: v.detach() for k, v in pm.merge_and_unload().state_dict().items()}
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc", tp=2)
    mcore_to_hf(tmp_path / "mc", tmp_path / "back", lora_dir=tmp_path / "lora")
    back = _read(tmp_path / "back")
    assert sorted(back) == sorted(base)
    for name, t in back.items():
        assert t.dtype == dtype and torch.equal(t, merged[name]), name  # same float32 product, same rounding
    assert sum(not torch.equal(back[n], base[n]) for n in back) == 4 * 2  # q, v, gate, down of 2 layers


def _shard_adapter(weight_name, a, b, tp, t):
    """Rank t's (A, B) for a LoRA on megatron weight ``weight_name`` (sharded like its layer)."""
    dim = tp_dim(weight_name)
    if dim == 0:  # column-parallel: A replicated, B split like the weight's rows
        return a.clone(), split_tp(weight_name, b, tp, t)
    if dim == 1:  # row-parallel: A split like the weight's columns, B replicated
        return split_tp(weight_name, a, tp, t), b.clone()
    return a.clone(), b.clone()


def _add_megatron_adapters(mc, full_pairs, *, into=None, adapter_name=None, args_extra=None):
    """Write {global megatron module: (A, B)} into mc's rank files (into=None) or into a separate
    adapter checkpoint ``into`` with the same layout."""
    ck = read_mcore(mc)
    leg = ck.legacy
    infix = f".{adapter_name}" if adapter_name else ""
    for t in range(leg.tp):
        for s in range(leg.pp):
            for e in range(leg.ep):
                raw = torch.load(leg.path(t, s, e), weights_only=False)  # not mapped: rewritten below
                models = [raw[k] for k in sorted(k for k in raw if k.startswith("model"))]
                out = [{} for _ in models] if into is not None else models
                for module, (a, b) in full_pairs.items():
                    slot = ck.grid.place(module + ".weight")[0]
                    if slot.stage != s or slot.ep_rank not in (None, e):
                        continue
                    local = slot.local.removesuffix(".weight")
                    ra, rb = _shard_adapter(slot.local, a, b, leg.tp, t)
                    out[slot.chunk][f"{local}.lora_A{infix}.weight"] = ra
                    out[slot.chunk][f"{local}.lora_B{infix}.weight"] = rb
                args = raw["args"]
                for k, v in (args_extra or {}).items():
                    setattr(args, k, v)
                root = mc if into is None else into
                save_rank(root, 1, t, s, leg.pp, out if len(out) > 1 else out[0], args, ep_rank=e, ep=leg.ep)
    if into is not None:
        write_tracker(into, 1)


def _expected_megatron(cfg, mc, full_pairs, scaling):
    ck = read_mcore(mc)
    full = {n: t.clone() for n, t in ck.tensors()}
    for module, (a, b) in full_pairs.items():
        full[module + ".weight"] = _expected(full[module + ".weight"], a, b, scaling)
    return maps.mcore_to_hf(cfg, full)


MEGATRON_TARGETS = ["decoder.layers.0.self_attention.linear_qkv", "decoder.layers.1.self_attention.linear_proj",
                    "decoder.layers.2.mlp.linear_fc1", "decoder.layers.3.mlp.linear_fc2"]


@pytest.mark.parametrize("where", ["in_rank_files", "separate_dir"])
def test_megatron_adapters_tp2pp2(make_hf, tmp_path, where):
    hf, cfg, base = make_hf("llama", num_hidden_layers=4)
    mc = tmp_path / "mc"
    hf_to_mcore(hf, mc, tp=2, pp=2)
    shapes = {r.mcore: r.mcore_shape for r in maps.rules(cfg, padded_vocab_size=256)}
    pairs = {m: _lora_pair(shapes[m + ".weight"], 4, i) for i, m in enumerate(MEGATRON_TARGETS)}
    expected = _expected_megatron(cfg, mc, pairs, 16 / 4)
    if where == "in_rank_files":
        _add_megatron_adapters(mc, pairs, adapter_name="default", args_extra={"lora_alpha": 16, "lora_r": 4})
        assert main(["mcore-to-hf", "--mcore-dir", str(mc), "--out", str(tmp_path / "back")]) == 0
    else:
        _add_megatron_adapters(mc, pairs, into=tmp_path / "lora")
        assert main(["mcore-to-hf", "--mcore-dir", str(mc), "--out", str(tmp_path / "back"), "--lora-dir",
                     str(tmp_path / "lora"), "--lora-alpha", "16"]) == 0
    back = _read(tmp_path / "back")
    assert sorted(back) == sorted(base)
    changed = 0
    for name, t in back.items():
        torch.testing.assert_close(t, expected[name], **FP32_TOL)
        changed += not torch.equal(t, base[name])
    # q, k, v of layer 0; o of layer 1; gate, up of layer 2; down of layer 3
    assert changed == 7


def test_megatron_expert_adapter_tp2ep2(make_hf, tmp_path):
    hf, cfg, base = make_hf("qwen3_moe", num_hidden_layers=4)
    mc = tmp_path / "mc"
    hf_to_mcore(hf, mc, tp=2, ep=2)
    ck = read_mcore(mc)
    shapes = {r.mcore: r.mcore_shape for r in maps.rules(cfg, padded_vocab_size=ck.padded_vocab_size)}
    targets = ["decoder.layers.0.mlp.experts.local_experts.3.linear_fc1",
               "decoder.layers.2.mlp.experts.local_experts.0.linear_fc2", "decoder.layers.1.self_attention.linear_qkv"]
    pairs = {m: _lora_pair(shapes[m + ".weight"], 2, i) for i, m in enumerate(targets)}
    expected = _expected_megatron(cfg, mc, pairs, 1.0)
    _add_megatron_adapters(mc, pairs, into=tmp_path / "lora")
    mcore_to_hf(mc, tmp_path / "back", lora_dir=tmp_path / "lora", lora_alpha=2.0)
    back = _read(tmp_path / "back")
    for name, t in back.items():
        torch.testing.assert_close(t, expected[name], **FP32_TOL)
    assert not torch.equal(back["model.layers.0.mlp.experts.3.up_proj.weight"],
                           base["model.layers.0.mlp.experts.3.up_proj.weight"])


def _err(capsys):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("bad,needle", [
    ("shape", "does not fit"),
    ("unknown", "does not have"),
    ("unpaired", "no lora_B"),
    ("dora", "not supported"),
    ("rank", "r=8"),
])
def test_bad_peft_adapter_exit_2(make_hf, tmp_path, capsys, bad, needle):
    hf, _, base = make_hf("llama")
    hf_to_mcore(hf, tmp_path / "mc")
    q = "model.layers.0.self_attn.q_proj"
    a, b = _lora_pair(base[q + ".weight"].shape, 4, 0)
    pairs = {q: (a, b)}
    if bad == "shape":
        pairs = {q: (a[:, :16], b)}
    elif bad == "unknown":
        pairs = {"model.layers.7.self_attn.q_proj": (a, b)}
    _write_peft(tmp_path / "lora", pairs, r=8 if bad == "rank" else 4, alpha=8)
    if bad in ("unpaired", "dora"):
        extra = ({f"base_model.model.{q}.lora_A.weight": a} if bad == "unpaired" else
                 {f"base_model.model.{q}.lora_A.weight": a, f"base_model.model.{q}.lora_B.weight": b,
                  f"base_model.model.{q}.lora_magnitude_vector": torch.ones(32)})
        save_file(extra, str(tmp_path / "lora" / "adapter_model.safetensors"))
    capsys.readouterr()
    assert main(["mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "back"),
                 "--lora-dir", str(tmp_path / "lora")]) == 2
    assert needle in _err(capsys)
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("bad,needle", [
    ("unknown", "does not have"),
    ("shape", "does not fit"),
    ("no_alpha", "--lora-alpha"),
    ("layout", "must match"),
    ("not_adapter", "neither"),
])
def test_bad_megatron_adapter_exit_2(make_hf, tmp_path, capsys, bad, needle):
    hf, cfg, _ = make_hf("llama", num_hidden_layers=4)
    mc = tmp_path / "mc"
    hf_to_mcore(hf, mc, tp=2, pp=2)
    m = "decoder.layers.0.self_attention.linear_qkv"
    shapes = {r.mcore: r.mcore_shape for r in maps.rules(cfg, padded_vocab_size=256)}
    a, b = _lora_pair(shapes[m + ".weight"], 4, 0)
    lora = tmp_path / "lora"
    if bad == "layout":
        hf_to_mcore(hf, tmp_path / "other", tp=1, pp=2)
        _add_megatron_adapters(tmp_path / "other", {m: (a, b)}, into=lora)
    elif bad == "not_adapter":
        lora.mkdir()
    elif bad == "unknown":
        # an adapter on a module the layer does not have (megatron names it; the base file lacks it)
        _add_megatron_adapters(mc, {m: (a, b)}, into=lora)
        leg = locate(lora)
        raw = torch.load(leg.path(0, 0), weights_only=False)
        raw["model"] = {k.replace("linear_qkv", "linear_q_proj"): v for k, v in raw["model"].items()}
        torch.save(raw, leg.path(0, 0))
    else:
        _add_megatron_adapters(mc, {m: (a[:, :16] if bad == "shape" else a, b)}, into=lora)
    flags = [] if bad == "no_alpha" else ["--lora-alpha", "8"]
    capsys.readouterr()
    assert main(["mcore-to-hf", "--mcore-dir", str(mc), "--out", str(tmp_path / "back"), "--lora-dir", str(lora),
                 *flags]) == 2
    assert needle in _err(capsys)
