"""Pattern rows shared by several architectures: embeddings, GQA attention, SwiGLU MLPs.

Megatron names are those of megatron-core's *local* GPT layer spec
(``get_gpt_layer_local_spec``): separate ``input_layernorm`` / ``pre_mlp_layernorm`` modules,
``linear_qkv`` with the per-query-group q|k|v interleave, ``linear_fc1`` = gate|up, and
``SequentialMLP`` experts under ``mlp.experts.local_experts.{expert}``.
"""

from __future__ import annotations

from mindspeed_ckpt.maps.spec import P, Pattern

HF_LAYER = "model.layers.{layer}"
MC_LAYER = "decoder.layers.{layer}"

EMBED: tuple[Pattern, ...] = (
    P("model.embed_tokens.weight", "embedding.word_embeddings.weight", ("vocab", "hidden"),
      transform="vocab", params=("vocab", "padded_vocab")),
)

FINAL: tuple[Pattern, ...] = (
    P("model.norm.weight", "decoder.final_layernorm.weight", ("hidden",)),
    P("lm_head.weight", "output_layer.weight", ("vocab", "hidden"),
      transform="vocab", params=("vocab", "padded_vocab"), when="untied"),
    # HF state dicts of tied models may still list lm_head (the same tensor as the embedding).
    P("lm_head.weight", "embedding.word_embeddings.weight", ("vocab", "hidden"),
      transform="vocab", params=("vocab", "padded_vocab"), when="tied", alias=True, optional=True),
)

NORMS_AROUND_ATTENTION = (
    P(f"{HF_LAYER}.input_layernorm.weight", f"{MC_LAYER}.input_layernorm.weight", ("hidden",)),
    P(f"{HF_LAYER}.post_attention_layernorm.weight", f"{MC_LAYER}.pre_mlp_layernorm.weight", ("hidden",)),
)


def _qkv(suffix: str, shapes: tuple[tuple[str, ...], ...], when: str | None) -> Pattern:
    names = tuple(f"{HF_LAYER}.self_attn.{p}_proj.{suffix}" for p in "qkv")
    return P(names, f"{MC_LAYER}.self_attention.linear_qkv.{suffix}", *shapes,
             transform="qkv", params=("heads", "groups", "head_dim"), when=when)


GQA_ATTENTION: tuple[Pattern, ...] = (
    *NORMS_AROUND_ATTENTION,
    _qkv("weight", (("q", "hidden"), ("kv", "hidden"), ("kv", "hidden")), None),
    _qkv("bias", (("q",), ("kv",), ("kv",)), "qkv_bias"),
    P(f"{HF_LAYER}.self_attn.q_norm.weight", f"{MC_LAYER}.self_attention.q_layernorm.weight", ("head_dim",), when="qk_norm"),
    P(f"{HF_LAYER}.self_attn.k_norm.weight", f"{MC_LAYER}.self_attention.k_layernorm.weight", ("head_dim",), when="qk_norm"),
    P(f"{HF_LAYER}.self_attn.o_proj.weight", f"{MC_LAYER}.self_attention.linear_proj.weight", ("hidden", "q")),
    P(f"{HF_LAYER}.self_attn.o_proj.bias", f"{MC_LAYER}.self_attention.linear_proj.bias", ("hidden",), when="proj_bias"),
)


def swiglu(hf: str, mc: str, gate: str, up: str, down: str, ffn: str, when: str | None = None,
           bias_when: str | None = None) -> tuple[Pattern, ...]:
    """A gated MLP: HF ``{hf}.{gate|up|down}.weight`` <-> megatron ``{mc}.linear_fc1|fc2``."""
    rows = [
        P((f"{hf}.{gate}.weight", f"{hf}.{up}.weight"), f"{mc}.linear_fc1.weight", (ffn, "hidden"), (ffn, "hidden"),
          transform="gate_up", when=when),
        P(f"{hf}.{down}.weight", f"{mc}.linear_fc2.weight", ("hidden", ffn), when=when),
    ]
    if bias_when is not None:
        rows += [
            P((f"{hf}.{gate}.bias", f"{hf}.{up}.bias"), f"{mc}.linear_fc1.bias", (ffn,), (ffn,),
              transform="gate_up", when=bias_when),
            P(f"{hf}.{down}.bias", f"{mc}.linear_fc2.bias", ("hidden",), when=bias_when),
        ]
    return tuple(rows)


DENSE_MLP = swiglu(f"{HF_LAYER}.mlp", f"{MC_LAYER}.mlp", "gate_proj", "up_proj", "down_proj", "ffn", bias_when="mlp_bias")

ROUTER = P(f"{HF_LAYER}.mlp.gate.weight", f"{MC_LAYER}.mlp.router.weight", ("experts", "hidden"))

# Per expert, HF's on-disk (Hub) names; transformers >= 5 fuses experts in memory but
# save_pretrained writes these.
EXPERT = swiglu(f"{HF_LAYER}.mlp.experts.{{expert}}", f"{MC_LAYER}.mlp.experts.local_experts.{{expert}}",
                "gate_proj", "up_proj", "down_proj", "moe_ffn")
