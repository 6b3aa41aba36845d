"""Write a tiny DeepSeek-V3-style Hugging Face ``config.json``: MLA attention, 1 dense layer then
MoE layers (4 routed experts, top-2, sigmoid router with expert bias, 1 shared expert) and one
Multi-Token-Prediction layer. The vocabulary and special-token ids come from the tokenizer.

    python model_config.py TOKENIZER_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys


def config(vocab_size: int, eos_id: int, pad_id: int) -> dict:
    """The config.json contents (about 2.4 M parameters with a 2048-token vocabulary)."""
    return dict(
        model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=vocab_size,
        hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, head_dim=16,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0,
        scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=1,
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu",
        initializer_range=0.02, attention_dropout=0.0, attention_bias=False, tie_word_embeddings=False,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id, use_cache=True,
    )  # fmt: skip


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: model_config.py TOKENIZER_DIR OUT_DIR", file=sys.stderr)
        return 2
    from tokenizers import Tokenizer  # not transformers: its import alone takes seconds

    with open(os.path.join(argv[0], "tokenizer_config.json"), encoding="utf-8") as handle:
        special = json.load(handle)
    tok = Tokenizer.from_file(os.path.join(argv[0], "tokenizer.json"))
    os.makedirs(argv[1], exist_ok=True)
    cfg = config(tok.get_vocab_size(), tok.token_to_id(special["eos_token"]), tok.token_to_id(special["pad_token"]))
    with open(os.path.join(argv[1], "config.json"), "w") as handle:
        json.dump(cfg, handle, indent=2)
    print(f"model: deepseek_v3, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers + 1 MTP, "
          f"{cfg['n_routed_experts']} experts top-{cfg['num_experts_per_tok']}, vocab {cfg['vocab_size']} -> {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
