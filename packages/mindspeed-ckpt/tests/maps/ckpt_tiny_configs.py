"""Tiny HF ``config.json`` contents for every mapped architecture, and random HF tensors for them.

The configs are complete enough for both ``mindspeed_ckpt.maps`` and
``transformers.AutoConfig.for_model``; sizes are tiny (hidden 32, vocab 96, 2-3 layers).
"""

from __future__ import annotations

import torch

from mindspeed_ckpt.maps import rules

_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
            n_routed_experts=4, moe_intermediate_size=16, num_experts_per_tok=2, first_k_dense_replace=1)

CONFIGS: dict[str, dict] = {
    "llama": dict(_BASE, model_type="llama"),
    "llama_bias": dict(_BASE, model_type="llama", attention_bias=True, mlp_bias=True, num_key_value_heads=1),
    "qwen2": dict(_BASE, model_type="qwen2", tie_word_embeddings=True),
    # head_dim 16 != hidden / heads: the explicit head_dim must win
    "qwen3": dict(_BASE, model_type="qwen3", head_dim=16),
    "mixtral": dict(_BASE, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    # layer 1 dense by mlp_only_layers; layers 0 and 2 MoE
    "qwen3_moe": dict(_BASE, model_type="qwen3_moe", num_hidden_layers=3, head_dim=8, num_experts=4,
                      moe_intermediate_size=16, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[1]),
    # decoder_sparse_step 2: layer 0 dense, layer 1 MoE with a gated shared expert
    "qwen2_moe": dict(_BASE, model_type="qwen2_moe", num_experts=4, moe_intermediate_size=16, num_experts_per_tok=2,
                      shared_expert_intermediate_size=24, decoder_sparse_step=2, mlp_only_layers=[],
                      tie_word_embeddings=True),
    "deepseek_v2": dict(_BASE, **_MLA, model_type="deepseek_v2", q_lora_rank=None, n_shared_experts=2),
    "deepseek_v3": dict(_BASE, **_MLA, model_type="deepseek_v3", num_hidden_layers=3, q_lora_rank=16, n_shared_experts=1,
                        n_group=2, topk_group=1, num_nextn_predict_layers=1),
}
# Variants only the synthetic (transformers-free) tests use.
SYNTHETIC_ONLY: dict[str, dict] = {
    "deepseek_v3_tied_mtp2": dict(CONFIGS["deepseek_v3"], tie_word_embeddings=True, num_nextn_predict_layers=2,
                                  n_shared_experts=0),
}


def random_hf_tensors(hf_config: dict, dtype: torch.dtype = torch.float32, seed: int = 0,
                      with_optional: bool = False) -> dict[str, torch.Tensor]:
    """HF tensors with the shapes the maps expect; alias tensors (MTP copies of the embedding
    and head, a tied lm_head when ``with_optional``) equal the tensor they duplicate."""
    g = torch.Generator().manual_seed(seed)
    rule_list = rules(hf_config)
    out: dict[str, torch.Tensor] = {}
    owner_hf = {r.mcore: r.hf[0] for r in rule_list if not r.alias}
    for r in rule_list:
        if r.alias:
            if with_optional or not r.optional:
                out[r.hf[0]] = out[owner_hf[r.mcore]].clone()
            continue
        for name, shape in zip(r.hf, r.hf_shapes, strict=True):
            out[name] = torch.randn(shape, generator=g).to(dtype)
    return out
