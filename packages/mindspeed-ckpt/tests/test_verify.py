"""``mindspeed convert verify``: transformers on the HF directory vs megatron-core (mindspeed_models.load_pretrained)
on the converted checkpoint. Pass cases at TP2xPP2 (dense) and TP2xEP2 (MoE, DeepSeek-V3 MLA + MTP), a
corrupted rank file that must fail with exit 1, the comparison rules on hand-made logits, and CLI errors."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from mindspeed_ckpt import verify as verify_mod
from mindspeed_ckpt.cli import main
from mindspeed_ckpt.convert import hf_to_mcore
from mindspeed_ckpt.hf_io import save_hf
from mindspeed_ckpt.verify import compare, make_batch, verify

sys.path.insert(0, str(Path(__file__).parent / "maps"))
from ckpt_tiny_configs import CONFIGS, random_hf_tensors  # noqa: E402

pytestmark = pytest.mark.slow  # megatron import + several models: ~10-20 s


def _needs_models():
    pytest.importorskip("transformers")
    pytest.importorskip("mindspeed_models")


def _tiny_hf(tmp_path: Path, arch: str, name: str = "hf") -> Path:
    """A tiny HF directory with trained-model-like scales (weights ~0.2, norms ~1), so fp32 logits are O(1)
    and a 1e-4 tolerance is meaningful."""
    cfg = dict(CONFIGS[arch])
    tensors = {k: (1.0 + 0.1 * v if "norm" in k else 0.2 * v) for k, v in random_hf_tensors(cfg).items()}
    save_hf(tmp_path / name, cfg, tensors)
    return tmp_path / name


@pytest.mark.parametrize(("arch", "flags"), [
    ("llama", dict(tp=2, pp=2)),
    ("qwen3_moe", dict(tp=2, ep=2)),
    ("deepseek_v3", dict(tp=2, ep=2)),  # MLA, shared expert, expert bias, one MTP layer (megatron side only)
])  # fmt: skip
def test_converted_checkpoint_passes(tmp_path, capsys, arch, flags):
    _needs_models()
    hf = _tiny_hf(tmp_path, arch)
    hf_to_mcore(hf, tmp_path / "mc", **flags)
    result = verify(hf, tmp_path / "mc")
    assert result.passed, result.report()
    assert result.lengths == (32, 16) and result.positions == 48
    assert result.max_abs_diff < 1e-4
    assert main(["verify", "--hf-dir", str(hf), "--mcore-dir", str(tmp_path / "mc"), "--seq-len", "8", "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "max abs logit diff" in out and out.rstrip().endswith("PASS") and "[8, 5, 2]" in out


def test_corrupted_rank_file_fails_with_exit_1(tmp_path, capsys):
    _needs_models()
    hf = _tiny_hf(tmp_path, "llama")
    hf_to_mcore(hf, tmp_path / "mc", tp=2, pp=2)
    rank_file = tmp_path / "mc" / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt"
    ck = torch.load(rank_file, weights_only=False)
    ck["model"]["decoder.layers.0.mlp.linear_fc2.weight"] += 0.01  # one tensor of one rank, slightly off
    torch.save(ck, rank_file)
    code = main(["verify", "--hf-dir", str(hf), "--mcore-dir", str(tmp_path / "mc")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert out.rstrip().endswith("FAIL")
    diff = float(out.split("max abs logit diff: ")[1].split()[0])
    assert diff > 1e-4  # the difference is printed, and it is what failed


def test_compare_rules():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ref = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    got = ref.clone()
    got[1, 2] += 100.0  # a padded position: never compared
    r = compare(ref, got, mask, 1e-4)
    assert r.passed and r.max_abs_diff == 0.0 and r.positions == 5 and r.lengths == (3, 2)
    got[0, 1] = ref[0, 1] + 2e-4
    assert not compare(ref, got, mask, 1e-4).passed
    flip = ref.clone()
    top = int(ref[0, 0].argmax())
    flip[0, 0, top] -= 1e3  # another token wins: an argmax mismatch fails even under a huge atol
    r = compare(ref, flip, mask, 1e6)
    assert r.argmax_mismatches == 1 and not r.passed
    nan = ref.clone()
    nan[0, 0, 0] = float("nan")
    assert not compare(ref, nan, mask, 1e6).passed
    with pytest.raises(ValueError, match="shapes differ"):
        compare(ref, ref[..., :4], mask, 1e-4)


def test_make_batch_right_pads():
    ids, mask = make_batch(50, 8, 3, seed=1)
    assert ids.shape == mask.shape == (3, 8)
    assert mask.sum(-1).tolist() == [8, 5, 2]
    assert (ids[mask == 0] == 0).all() and int(ids.max()) < 50
    assert torch.equal(make_batch(50, 8, 3, seed=1)[0], ids)


def test_cli_bad_input_exits_2(tmp_path, capsys):
    hf = _tiny_hf(tmp_path, "llama")
    cases = [
        (["verify", "--hf-dir", str(tmp_path / "nope"), "--mcore-dir", str(tmp_path)], "--hf-dir"),
        (["verify", "--hf-dir", str(hf), "--mcore-dir", str(tmp_path / "nope")], "--mcore-dir"),
        (["verify", "--hf-dir", str(hf), "--mcore-dir", str(tmp_path), "--seq-len", "0"], "--seq-len"),
        (["verify", "--hf-dir", str(hf), "--mcore-dir", str(tmp_path), "--seq-len", "65"], "max_position_embeddings"),
        (["verify", "--hf-dir", str(hf), "--mcore-dir", str(tmp_path), "--atol", "-1"], "--atol"),
        (["verify", "--hf-dir", str(hf)], "--mcore-dir"),
    ]
    for argv, word in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error:") and word in err and err.count("\n") == 1, err


@pytest.mark.parametrize(("module", "pip"), [("transformers", "pip install transformers"),
                                             ("mindspeed_models", "pip install mindspeed-models")])
def test_missing_optional_dependency_is_one_line(tmp_path, capsys, monkeypatch, module, pip):
    if module == "mindspeed_models":  # verify asks for transformers first: with both absent it names that one
        pytest.importorskip("transformers")
    hf = _tiny_hf(tmp_path, "llama")
    real = importlib.util.find_spec
    monkeypatch.setattr(verify_mod.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    assert main(["verify", "--hf-dir", str(hf), "--mcore-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert pip in err and err.count("\n") == 1
