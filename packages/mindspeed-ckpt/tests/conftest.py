"""Tiny HF-style checkpoints for the conversion tests, made without transformers: a
hand-written config.json and random tensors named and shaped per the maps."""

import sys
from pathlib import Path

import pytest
import torch

from mindspeed_ckpt import maps
from mindspeed_ckpt.hf_io import save_hf

sys.path.insert(0, str(Path(__file__).parent / "maps"))  # ckpt_tiny_configs: the MoE/MLA tiny configs
from ckpt_tiny_configs import CONFIGS, SYNTHETIC_ONLY, random_hf_tensors  # noqa: E402

_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=64, rope_theta=10000.0,
             tie_word_embeddings=False)

DENSE_CONFIGS = {
    "llama": dict(_BASE, model_type="llama"),
    "qwen2": dict(_BASE, model_type="qwen2", tie_word_embeddings=True),  # q/k/v bias, tied head
    "qwen3": dict(_BASE, model_type="qwen3", head_dim=16),  # q/k norms, head_dim != hidden / heads
}


def random_tensors(cfg: dict, dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 1.0) -> dict[str, torch.Tensor]:
    """One random tensor (normal, ``std``) per HF name the maps expect (no tied lm_head copy)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for rule in maps.rules(cfg):
        if rule.alias:
            continue
        for name, shape in zip(rule.hf, rule.hf_shapes, strict=True):
            out[name] = (torch.randn(shape, generator=g) * std).to(dtype)
    return out


@pytest.fixture
def make_hf(tmp_path):
    """make_hf(arch, dtype=fp32, shard_bytes=None, name="hf", std=1.0, **overrides) -> (dir, config,
    tensors); arch: a DENSE_CONFIGS key or any ckpt_tiny_configs.CONFIGS key (MoE, MLA, MTP), its
    config updated by ``overrides``; a small shard_bytes writes several shards with an index."""

    def make(arch: str, dtype: torch.dtype = torch.float32, shard_bytes: int | None = None, name: str = "hf",
             std: float = 1.0, **overrides):
        if arch in DENSE_CONFIGS:
            cfg = dict(DENSE_CONFIGS[arch], **overrides)
            tensors = random_tensors(cfg, dtype, std=std)
        else:
            cfg = dict({**CONFIGS, **SYNTHETIC_ONLY}[arch], **overrides)
            tensors = random_hf_tensors(cfg, dtype)
        d = tmp_path / name
        save_hf(d, cfg, tensors, **({"max_shard_bytes": shard_bytes} if shard_bytes else {}))
        (d / "tokenizer.json").write_text('{"dummy": true}\n')
        return d, cfg, tensors

    return make
