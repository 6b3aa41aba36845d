"""Shared helpers for the model tests: tiny random Hugging Face models and a naive HF -> megatron renaming.

Loaded by path (``load_helpers()`` in each test file). The renaming below is written from the
megatron local-spec parameter layout alone, independently of ``mindspeed_ckpt.maps``, so
comparing our model loaded through it with transformers proves the model, not the map.
"""

from __future__ import annotations

import torch

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, max_position_embeddings=128)  # fmt: skip
LENGTHS = (10, 6)


def tiny_hf(model_type: str, seed: int = 0, **overrides):
    """(config dict, fp32 eval HF model with every parameter random) for ``model_type``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**SIZES, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize_(model, seed)
    return model.config.to_dict(), model


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Norm weights near 1, biases and matrices random: a zero bias or unit norm would hide a mapping bug."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.08 * noise)


def naive_state(hf_config: dict, hf_model: torch.nn.Module, padded_vocab: int | None = None) -> dict[str, torch.Tensor]:
    """megatron local-spec state dict (TP=1) from an HF dense model, renamed by hand (vocab rows zero-padded)."""
    sd = hf_model.state_dict()
    heads, groups = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    hidden = hf_config["hidden_size"]
    dim = hf_config.get("head_dim") or hidden // heads
    out = {"embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": sd["model.norm.weight"]}  # fmt: skip
    if not hf_config.get("tie_word_embeddings"):
        out["output_layer.weight"] = sd["lm_head.weight"]
    for i in range(hf_config["num_hidden_layers"]):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."

        def qkv(kind: str, shape: tuple) -> torch.Tensor:
            # megatron's fused qkv groups rows per KV head: [q of its heads, k, v] for each group.
            parts = [sd[f"{hf}self_attn.{p}_proj.{kind}"].reshape(groups, -1, *shape) for p in "qkv"]
            return torch.cat(parts, dim=1).reshape(-1, *shape)

        out[mc + "self_attention.linear_qkv.weight"] = qkv("weight", (hidden,))
        if f"{hf}self_attn.q_proj.bias" in sd:
            out[mc + "self_attention.linear_qkv.bias"] = qkv("bias", ())
        if f"{hf}self_attn.q_norm.weight" in sd:
            out[mc + "self_attention.q_layernorm.weight"] = sd[hf + "self_attn.q_norm.weight"]
            out[mc + "self_attention.k_layernorm.weight"] = sd[hf + "self_attn.k_norm.weight"]
        out[mc + "self_attention.linear_proj.weight"] = sd[hf + "self_attn.o_proj.weight"]
        if f"{hf}self_attn.o_proj.bias" in sd:  # llama attention_bias + mlp_bias
            out[mc + "self_attention.linear_proj.bias"] = sd[hf + "self_attn.o_proj.bias"]
            out[mc + "mlp.linear_fc1.bias"] = torch.cat([sd[hf + "mlp.gate_proj.bias"], sd[hf + "mlp.up_proj.bias"]])
            out[mc + "mlp.linear_fc2.bias"] = sd[hf + "mlp.down_proj.bias"]
        out[mc + "input_layernorm.weight"] = sd[hf + "input_layernorm.weight"]
        out[mc + "pre_mlp_layernorm.weight"] = sd[hf + "post_attention_layernorm.weight"]
        out[mc + "mlp.linear_fc1.weight"] = torch.cat([sd[hf + "mlp.gate_proj.weight"], sd[hf + "mlp.up_proj.weight"]])
        out[mc + "mlp.linear_fc2.weight"] = sd[hf + "mlp.down_proj.weight"]
    if padded_vocab is not None:
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if name in out:
                extra = out[name].new_zeros(padded_vocab - out[name].shape[0], hidden)
                out[name] = torch.cat([out[name], extra])
    assert dim * heads == out["decoder.layers.0.self_attention.linear_proj.weight"].shape[1]
    return out


def batch(vocab: int, lengths=LENGTHS, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, S], attention_mask [B, S]) of sequences of ``lengths``, right padded."""
    gen = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), seq), generator=gen)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0
    return ids, mask


def hf_logits(hf_model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=ids, attention_mask=mask).logits.float()


def assert_logits_match(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor, atol: float = 1e-4) -> float:
    """Max |diff| <= atol and identical argmax over the valid (mask == 1) positions; returns the max diff."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    valid = mask.bool()
    a, b = ours[valid], theirs[valid]
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"max abs logit diff {diff:.3g} > {atol}"
    assert torch.equal(a.argmax(-1), b.argmax(-1)), "argmax differs"
    return diff


MOE_SIZES = dict(num_local_experts=8, num_experts_per_tok=2)
"""Tiny MoE routing for tiny_hf(..., **MOE_SIZES): 8 experts, top-2 (qwen3_moe also takes moe_intermediate_size)."""


def naive_moe_state(hf_config: dict, hf_model: torch.nn.Module, padded_vocab: int | None = None) -> dict[str, torch.Tensor]:
    """megatron local-spec state dict (TP=1, EP=1) of an HF qwen3_moe / mixtral model, renamed by hand.

    transformers 5 holds each MoE layer's experts fused in memory: ``mlp.experts.gate_up_proj``
    [E, 2F, H] (gate rows then up rows, as megatron's fc1) and ``mlp.experts.down_proj`` [E, H, F];
    the router is ``mlp.gate.weight`` [E, H]; qwen2_moe's ``shared_expert`` (+ ``shared_expert_gate`` [1, H])
    becomes megatron's ``shared_experts`` (+ ``gate_weight``). Dense layers (mlp_only_layers) keep dense names.
    """
    sd = hf_model.state_dict()
    moe_layers = [i for i in range(hf_config["num_hidden_layers"]) if f"model.layers.{i}.mlp.experts.gate_up_proj" in sd]

    class _WithDenseStandIns:
        # naive_state renames attention/norms/embeddings; it expects dense MLP names, given here as stand-ins.
        def state_dict(self):
            extra = {f"model.layers.{i}.mlp.{p}_proj.weight": torch.empty(0) for i in moe_layers for p in ("gate", "up", "down")}
            return {**sd, **extra}

    out = naive_state(hf_config, _WithDenseStandIns(), padded_vocab)
    for i in moe_layers:
        hf, mc = f"model.layers.{i}.mlp.", f"decoder.layers.{i}.mlp."
        del out[mc + "linear_fc1.weight"], out[mc + "linear_fc2.weight"]
        out[mc + "router.weight"] = sd[hf + "gate.weight"]
        if hf + "shared_expert.gate_proj.weight" in sd:  # qwen2_moe: one gated shared expert
            shared = [sd[hf + f"shared_expert.{p}_proj.weight"] for p in ("gate", "up", "down")]
            out[mc + "shared_experts.linear_fc1.weight"] = torch.cat(shared[:2])
            out[mc + "shared_experts.linear_fc2.weight"] = shared[2]
            out[mc + "shared_experts.gate_weight"] = sd[hf + "shared_expert_gate.weight"]
        for e, (fc1, fc2) in enumerate(zip(sd[hf + "experts.gate_up_proj"], sd[hf + "experts.down_proj"], strict=True)):
            out[f"{mc}experts.local_experts.{e}.linear_fc1.weight"] = fc1
            out[f"{mc}experts.local_experts.{e}.linear_fc2.weight"] = fc2
    return out
