"""``--format torch_dist``: HF -> torch_dist (megatron-core's dist_checkpointing.save) -> HF is bit-identical
(fp32, bf16, a --dtype cast; dense, tied, MoE, DeepSeek-V3 MLA + MTP); megatron-core's own
``dist_checkpointing.load`` into GPTModels built at TP=2 (2 gloo ranks) reproduces transformers' logits
(dense and MoE); CLI flags and errors."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from mindspeed_ckpt import torch_dist as td
from mindspeed_ckpt.cli import main
from mindspeed_ckpt.convert import mcore_to_hf
from mindspeed_ckpt.hf_io import HFReader, save_hf
from mindspeed_ckpt.torch_dist import hf_to_torch_dist, is_torch_dist
from mindspeed_ckpt.verify import compare, make_batch

sys.path.insert(0, str(Path(__file__).parent / "maps"))
from ckpt_tiny_configs import CONFIGS, random_hf_tensors  # noqa: E402

pytest.importorskip("mindspeed_models")
pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300), pytest.mark.slow]


def _hf(tmp_path: Path, arch: str, dtype=torch.float32, name: str = "hf", scale: bool = False):
    """A tiny HF directory (+ tokenizer file); ``scale``: trained-model-like weights for logits comparisons."""
    cfg = dict(CONFIGS[arch])
    tensors = random_hf_tensors(cfg, dtype)
    if scale:
        tensors = {k: (1.0 + 0.1 * v if "norm" in k else 0.2 * v) for k, v in tensors.items()}
    save_hf(tmp_path / name, cfg, tensors)
    (tmp_path / name / "tokenizer.json").write_text('{"dummy": true}\n')
    return tmp_path / name, cfg, tensors


def _assert_same(hf_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    got = HFReader(hf_dir)
    assert set(got.names) == set(expected)
    for name, t in expected.items():
        back = got.get(name)
        assert back.dtype == t.dtype and torch.equal(back, t), name


@pytest.mark.parametrize(("arch", "dtype"), [("llama", torch.float32), ("qwen2", torch.bfloat16),
                                             ("qwen3_moe", torch.bfloat16), ("deepseek_v3", torch.float32)])
def test_round_trip_is_bit_identical(tmp_path, arch, dtype):
    hf, _, tensors = _hf(tmp_path, arch, dtype)
    hf_to_torch_dist(hf, tmp_path / "mc")
    assert is_torch_dist(tmp_path / "mc")
    mcore_to_hf(tmp_path / "mc", tmp_path / "back")  # dispatches on the format
    _assert_same(tmp_path / "back", tensors)
    assert (tmp_path / "back" / "tokenizer.json").is_file()


def test_layout_and_dtype_cast(tmp_path):
    hf, _, tensors = _hf(tmp_path, "llama")
    hf_to_torch_dist(hf, tmp_path / "mc", dtype="bf16")
    mc = tmp_path / "mc"
    assert (mc / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert (mc / "iter_0000001" / "metadata.json").is_file() and (mc / "hf_config" / "config.json").is_file()
    assert (mc / "hf_config" / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".mc.*"))  # the staging directory was renamed away
    assert td.saved_dtype(mc / "iter_0000001") == torch.bfloat16
    mcore_to_hf(mc, tmp_path / "back")
    _assert_same(tmp_path / "back", {k: v.to(torch.bfloat16) for k, v in tensors.items()})


def _tp2_world(rank, jobs):
    """For each (torch_dist dir, HF config, ids, mask, output file): megatron-core GPTModel at TP=2 built by
    mindspeed_models, filled by megatron's own dist_checkpointing.load; rank 0 writes the logits."""
    from mindspeed_models.adaptor import install

    install("cpu")
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    import mindspeed_models as mm

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    for mc_dir, cfg, ids, mask, out in jobs:
        # the checkpoint has 128 rows (96 padded to 128 at TP1); TP=2 pads to a multiple of 64 x 2 = 128
        spec = mm.from_hf_config(cfg, tensor_model_parallel_size=2, make_vocab_size_divisible_by=64,
                                 perform_initialization=False)
        model = mm.build_model(spec)
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), f"{mc_dir}/iter_0000001"))
        model.eval()
        with torch.no_grad():
            logits = mm.logits(model, ids, mask)
        if rank == 0:
            torch.save(logits, out)
        dist.barrier()
    ps.destroy_model_parallel()


def test_megatron_loads_torch_dist_at_tp2_with_transformers_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    testing = pytest.importorskip("mindspeed_kernels.testing")
    jobs, refs = [], {}
    ids, mask = make_batch(CONFIGS["llama"]["vocab_size"], 16, 2, seed=3)
    for arch in ("llama", "qwen3_moe"):
        hf, cfg, _ = _hf(tmp_path, arch, name=arch, scale=True)
        hf_to_torch_dist(hf, tmp_path / f"mc_{arch}")
        model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        with torch.no_grad():
            refs[arch] = model(input_ids=ids, attention_mask=mask).logits
        assert refs[arch][mask.bool()].std() > 0.1  # not a vacuous comparison of near-zero logits
        jobs.append((str(tmp_path / f"mc_{arch}"), cfg, ids, mask, str(tmp_path / f"logits_{arch}.pt")))
    testing.run_world(_tp2_world, 2, jobs, timeout_s=200)
    for arch, ref in refs.items():
        result = compare(ref, torch.load(tmp_path / f"logits_{arch}.pt"), mask, atol=1e-4)
        assert result.passed, f"{arch}: {result.report()}"


def test_cli_torch_dist_then_verify_and_back(tmp_path, capsys):
    pytest.importorskip("transformers")
    hf, _, tensors = _hf(tmp_path, "qwen3_moe", scale=True)
    mc, back = tmp_path / "mc", tmp_path / "back"
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(mc), "--format", "torch_dist"]) == 0
    assert "torch_dist" in capsys.readouterr().out
    assert main(["verify", "--hf-dir", str(hf), "--mcore-dir", str(mc)]) == 0, capsys.readouterr()
    assert capsys.readouterr().out.rstrip().endswith("PASS")
    assert main(["mcore-to-hf", "--mcore-dir", str(mc), "--out", str(back)]) == 0
    _assert_same(back, tensors)
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(mc), "--format", "torch_dist"]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    # LoRA merging is legacy-only: refused in one line that names what works, and nothing is written
    assert main(["mcore-to-hf", "--mcore-dir", str(mc), "--out", str(tmp_path / "merged"), "--lora-dir", str(hf)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LoRA merging" in err and "merge_and_unload" in err
    assert not (tmp_path / "merged").exists()
    # an adapter scale without an adapter directory is not silently dropped either
    assert main(["mcore-to-hf", "--mcore-dir", str(mc), "--out", str(tmp_path / "merged"), "--lora-alpha", "16"]) == 2
    assert "LoRA merging" in capsys.readouterr().err and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("flag", [["--noop-layers", "1"], ["--progress"]])
def test_cli_refuses_flags_the_torch_dist_writer_does_not_honour(tmp_path, capsys, flag):
    hf, _, _ = _hf(tmp_path, "qwen3_moe")
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--format", "torch_dist", *flag]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag[0]} is not implemented for --format torch_dist" in err
    assert not (tmp_path / "mc").exists()


def test_lora_tensors_in_a_torch_dist_checkpoint_are_refused(tmp_path):
    """Exporting would keep the base weights and drop the adapters: refused, naming a tensor."""
    import torch.distributed.checkpoint as dcp

    from mindspeed_ckpt.torch_dist import EMBEDDING, saved_dtype

    state = {EMBEDDING: torch.zeros(4, 2), "decoder.layers.0.mlp.linear_fc1.lora_A.weight": torch.zeros(1, 2)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    with pytest.raises(NotImplementedError, match="lora_A.weight.*1 in all.*--ckpt-format torch"):
        saved_dtype(tmp_path)
    dcp.save({EMBEDDING: torch.zeros(4, 2, dtype=torch.bfloat16)}, storage_writer=dcp.FileSystemWriter(str(tmp_path / "b")),
             no_dist=True)  # fmt: skip
    assert saved_dtype(tmp_path / "b") == torch.bfloat16


@pytest.mark.parametrize("flag", [["--tp", "2"], ["--pp", "2"], ["--ep", "2"], ["--vpp", "2"], ["--num-layer-list", "1,1"]])
def test_cli_rejects_layout_flags(tmp_path, capsys, flag):
    hf, _, _ = _hf(tmp_path, "qwen3_moe")
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--format", "torch_dist", *flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag[0]}") and "torch_dist" in err and err.count("\n") == 1
    assert not (tmp_path / "mc").exists()


def test_errors_are_one_line(tmp_path, capsys, monkeypatch):
    hf, _, _ = _hf(tmp_path, "llama")
    hf_to_torch_dist(hf, tmp_path / "mc")
    (tmp_path / "mc" / "hf_config" / "config.json").unlink()
    assert main(["mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "back")]) == 2
    assert "hf_config/config.json is missing" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(td.importlib.util, "find_spec", lambda n, *a: None if n == "mindspeed_models" else real(n, *a))
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "m2"), "--format", "torch_dist"]) == 2
    err = capsys.readouterr().err
    assert "pip install mindspeed-models" in err and err.count("\n") == 1


def test_checks_hf_tensors_like_the_legacy_path(tmp_path, capsys):
    """A DeepSeek-V3 checkpoint without its MTP layer (as save_pretrained writes it) is refused before megatron
    runs, with the legacy path's hint; a tied lm_head that differs from the embedding too."""
    cfg = dict(CONFIGS["deepseek_v3"])
    mtp = f"model.layers.{cfg['num_hidden_layers']}."
    save_hf(tmp_path / "ds", cfg, {k: v for k, v in random_hf_tensors(cfg).items() if not k.startswith(mtp)})
    assert main(["hf-to-mcore", "--hf-dir", str(tmp_path / "ds"), "--out", str(tmp_path / "mc"), "--format", "torch_dist"]) == 2
    assert "num_nextn_predict_layers to 0" in capsys.readouterr().err
    cfg = dict(CONFIGS["qwen2"])
    tensors = random_hf_tensors(cfg, with_optional=True)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
    save_hf(tmp_path / "tied", cfg, tensors)
    assert main(["hf-to-mcore", "--hf-dir", str(tmp_path / "tied"), "--out", str(tmp_path / "mc"), "--format", "torch_dist"]) == 2
    assert "differs from the tensor megatron shares it with" in capsys.readouterr().err
    assert not (tmp_path / "mc").exists()
