"""load_pretrained on directories written by transformers' save_pretrained (single file and sharded)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

pytest.importorskip("transformers")

import models_hf_helpers as helpers  # noqa: E402  (tests/conftest.py puts it on sys.path)

from mindspeed_models import PretrainedModel, load_pretrained  # noqa: E402
from mindspeed_models.pretrained import SafetensorsDir  # noqa: E402

CASES = {
    "llama": ("llama", {}, None),
    "llama_rope_llama3_sharded": (
        "llama",
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
        "100KB",
    ),
    "qwen2_bias_tied_sharded": ("qwen2", {"tie_word_embeddings": True}, "100KB"),
    "qwen2_yarn": ("qwen2", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                "original_max_position_embeddings": 32}}, None),
    "qwen3_qk_norm_head_dim": ("qwen3", {"head_dim": 24}, None),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_pretrained_logits_match_transformers(case, tmp_path):
    pytest.importorskip("mindspeed_ckpt.maps")
    model_type, overrides, shard = CASES[case]
    _, hf_model = helpers.tiny_hf(model_type, **overrides)
    hf_model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard is not None)
    loaded = load_pretrained(tmp_path)
    assert isinstance(loaded, PretrainedModel) and not loaded.model.training
    assert loaded.spec.architecture == model_type and loaded.path == tmp_path
    ids, mask = helpers.batch(hf_model.config.vocab_size)
    ours = loaded.logits(ids, mask)
    assert ours.dtype == torch.float32 and not ours.requires_grad
    helpers.assert_logits_match(ours, helpers.hf_logits(hf_model, ids, mask), mask)


def test_safetensors_dir_reads_lazily_and_closes(tmp_path):
    _, hf_model = helpers.tiny_hf("qwen3")
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    with SafetensorsDir(tmp_path) as tensors:
        assert set(tensors) == set(index["weight_map"]) and len(tensors) == len(index["weight_map"])
        assert not tensors._handles  # nothing opened until a tensor is asked for
        name = "model.layers.1.mlp.down_proj.weight"
        assert torch.equal(tensors[name], hf_model.state_dict()[name])
        assert len(tensors._handles) == 1
        assert "nope" not in tensors
    assert not tensors._handles


def test_load_pretrained_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_pretrained(tmp_path)
    mcore = tmp_path / "mcore"
    (mcore / "iter_0000010").mkdir(parents=True)
    (mcore / "latest_checkpointed_iteration.txt").write_text("10")
    with pytest.raises(NotImplementedError, match="Megatron checkpoint.*issue #4"):
        load_pretrained(mcore)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    config = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1,
              "intermediate_size": 64, "vocab_size": 64}  # fmt: skip
    (hf_dir / "config.json").write_text(json.dumps(config))
    if importlib.util.find_spec("mindspeed_ckpt") is not None:
        with pytest.raises(FileNotFoundError, match="no model.safetensors"):
            load_pretrained(hf_dir)
    real_find_spec = importlib.util.find_spec
    without_ckpt = lambda name, *a: None if name == "mindspeed_ckpt" else real_find_spec(name, *a)
    monkeypatch.setattr(importlib.util, "find_spec", without_ckpt)
    with pytest.raises(ImportError, match=r"pip install 'mindspeed-models\[hf\]'"):
        load_pretrained(hf_dir)


def test_checkpoint_that_does_not_fit_the_config(tmp_path):
    pytest.importorskip("mindspeed_ckpt.maps")
    _, hf_model = helpers.tiny_hf("llama")
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError):
        load_pretrained(tmp_path)
