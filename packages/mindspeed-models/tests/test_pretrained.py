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
    with pytest.raises(FileNotFoundError, match="hf_config/config.json is missing"):
        load_pretrained(mcore)
    (mcore / "hf_config").mkdir()
    (mcore / "hf_config" / "config.json").write_text("{}")
    (mcore / "latest_checkpointed_iteration.txt").write_text("11")
    with pytest.raises(FileNotFoundError, match="iter_0000011 .* is missing"):
        load_pretrained(mcore)
    (mcore / "latest_checkpointed_iteration.txt").write_text("ten")
    with pytest.raises(ValueError, match="expected an iteration number"):
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


# --- Megatron checkpoint directories ------------------------------------------------------------

MEGATRON_CASES = {
    "qwen3_tp2_pp2": ("qwen3", {"num_hidden_layers": 4}, dict(tp=2, pp=2)),
    "qwen2_tied_vpp2": ("qwen2", {"num_hidden_layers": 4, "tie_word_embeddings": True}, dict(pp=2, vpp=2)),
    "qwen3_moe_tp2_ep2": ("qwen3_moe", {"moe_intermediate_size": 32, **helpers.MOE_SIZES}, dict(tp=2, ep=2)),
    "mixtral_uneven_pp": ("mixtral", {"num_hidden_layers": 3, **helpers.MOE_SIZES}, dict(pp=2, num_layer_list="1,2")),
    "qwen3_noop_layer_pp2": ("qwen3", {"num_hidden_layers": 3}, dict(pp=2, noop_layers="1")),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MEGATRON_CASES))
def test_load_pretrained_reads_megatron_legacy_checkpoints(case, tmp_path):
    """HF -> mindspeed convert hf-to-mcore (TP/PP/VPP/EP, uneven PP) -> load_pretrained(megatron dir): HF's logits."""
    pytest.importorskip("mindspeed_ckpt")
    from mindspeed_ckpt.convert import hf_to_mcore

    model_type, overrides, layout = MEGATRON_CASES[case]
    _, hf_model = helpers.tiny_hf(model_type, **overrides)
    hf_model.save_pretrained(tmp_path / "hf")
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", **layout)
    loaded = load_pretrained(tmp_path / "mcore")
    assert loaded.spec.padded_vocab_size % 128 == 0 and loaded.spec.vocab_size == hf_model.config.vocab_size
    ids, mask = helpers.batch(hf_model.config.vocab_size)
    helpers.assert_logits_match(loaded.logits(ids, mask), helpers.hf_logits(hf_model, ids, mask), mask)


TORCH_DIST_CASES = {
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", {"moe_intermediate_size": 32, **helpers.MOE_SIZES}),
    "deepseek_v3": ("deepseek_v3", dict(num_hidden_layers=2, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
                                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
                                        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                                        moe_intermediate_size=32)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TORCH_DIST_CASES))
def test_load_pretrained_reads_torch_dist_checkpoints(case, tmp_path):
    """A torch_dist checkpoint written by megatron-core's own dist_checkpointing.save loads back: HF's logits."""
    pytest.importorskip("mindspeed_ckpt")
    import shutil

    from megatron.core import dist_checkpointing

    model_type, overrides = TORCH_DIST_CASES[case]
    _, hf_model = helpers.tiny_hf(model_type, **overrides)
    hf_model.save_pretrained(tmp_path / "hf")
    source = load_pretrained(tmp_path / "hf", make_vocab_size_divisible_by=128)
    step = tmp_path / "mcore" / "iter_0000003"
    step.mkdir(parents=True)
    # as a training run saves: the model's sharded state plus common entries
    dist_checkpointing.save({**source.model.sharded_state_dict(), "iteration": 3, "checkpoint_version": 3.0}, str(step))
    (tmp_path / "mcore" / "latest_checkpointed_iteration.txt").write_text("3")
    (tmp_path / "mcore" / "hf_config").mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "mcore" / "hf_config" / "config.json")
    loaded = load_pretrained(tmp_path / "mcore")
    assert loaded.spec.padded_vocab_size == source.spec.padded_vocab_size == 256
    ids, mask = helpers.batch(hf_model.config.vocab_size)
    helpers.assert_logits_match(loaded.logits(ids, mask), helpers.hf_logits(hf_model, ids, mask), mask)


def test_load_pretrained_megatron_errors(tmp_path):
    pytest.importorskip("mindspeed_ckpt")
    from mindspeed_ckpt.convert import hf_to_mcore

    _, hf_model = helpers.tiny_hf("llama")
    hf_model.save_pretrained(tmp_path / "hf")
    hf_to_mcore(tmp_path / "hf", tmp_path / "mcore")
    rank_file = next((tmp_path / "mcore").glob("iter_*/mp_rank_00/model_optim_rng.pt"))
    ckpt = torch.load(rank_file, weights_only=False)
    del ckpt["model"]["decoder.final_layernorm.weight"]
    torch.save(ckpt, rank_file)
    with pytest.raises(ValueError, match="lacks 'decoder.final_layernorm.weight'"):
        load_pretrained(tmp_path / "mcore")
