"""MoE and DeepSeek (MLA + DeepSeek MoE) parts of the HF config -> megatron TransformerConfig mapping.

Called by :func:`mindspeed_models.config.from_hf_config`; values come from the key tables of
:mod:`mindspeed_models.architectures`.
"""

from __future__ import annotations

from typing import Any

from mindspeed_models._validate import finite_number, positive_int
from mindspeed_models.architectures import Architecture
from mindspeed_models.mla import mla_config_fields
from mindspeed_models.moe import DeepSeekRouting

__all__ = ["check_deepseek_overrides", "check_moe_overrides", "deepseek_kwargs", "moe_kwargs"]


def moe_kwargs(arch: Architecture, hf: dict, v: dict[str, Any]) -> dict[str, Any]:
    """Router/expert TransformerConfig fields of an MoE architecture (``v`` from :func:`_resolve`)."""
    experts = _num_experts(arch, hf)
    topk = v["num_experts_per_tok"]
    positive_int("num_experts_per_tok", topk)
    if topk > experts:
        raise ValueError(f"config.json: num_experts_per_tok={topk} must be <= the number of experts ({experts})")
    # qwen3_moe: moe_intermediate_size; mixtral: intermediate_size is the expert size.
    ffn = v.get("moe_intermediate_size", v["intermediate_size"])
    positive_int("moe_intermediate_size", ffn)
    # Mixtral always renormalises its top-k softmax probabilities (it has no norm_topk_prob key).
    renormalise = v.get("norm_topk_prob", True)
    if not isinstance(renormalise, bool):
        raise ValueError(f"config.json: norm_topk_prob={renormalise!r} must be true or false")
    finite_number("router_aux_loss_coef", v["router_aux_loss_coef"])
    layer_types = v.get("layer_types")
    if layer_types is not None and set(layer_types) - {"full_attention"}:
        raise ValueError(f"config.json: layer_types={layer_types!r}: sliding windows are not implemented for MoE models")
    shared = v.get("shared_expert_intermediate_size") or 0
    if shared:
        positive_int("shared_expert_intermediate_size", shared)
    return dict(
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=ffn,
        moe_layer_freq=_moe_layer_freq(v),
        # HF: p = softmax(all logits), top-k of p, then p / sum(top-k p) iff renormalising.
        # megatron pre_softmax=False: top-k of logits, softmax over the k — the same renormalised
        # probabilities (softmax is monotonic); pre_softmax=True keeps softmax-over-all values.
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not renormalise,
        moe_router_topk_scaling_factor=None,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=float(v["router_aux_loss_coef"]),
        moe_token_dispatcher_type="alltoall",
        # Qwen2-MoE: one shared expert, its output scaled by sigmoid(x . gate_weight) (HF shared_expert_gate).
        moe_shared_expert_intermediate_size=shared or None,
        moe_shared_expert_gate=bool(shared),
        # False: megatron's SequentialMLP; True: mindspeed_models.moe.GroupedSwiGLUExperts (grouped
        # GEMM). Both hold local_experts.{e}.linear_fc1/linear_fc2, the names of mindspeed_ckpt.maps.
        moe_grouped_gemm=False,
    )


def _num_experts(arch: Architecture, hf: dict) -> int:
    """The expert count from either spelling (num_experts / num_local_experts); both set must agree.

    Absent both, the architecture's default (the key of the pair whose default is not derived).
    """
    pair = [k for k in arch.keys if k.target == "TransformerConfig.num_moe_experts"]
    given = {k.name: hf[k.name] for k in pair if hf.get(k.name) is not None}
    for name, value in given.items():
        positive_int(name, value)
    if len(set(given.values())) > 1:
        raise ValueError(f"config.json: num_experts and num_local_experts disagree ({given}); keep one of them")
    if given:
        return next(iter(given.values()))
    return next(k.default for k in pair if not k.derived)


def _moe_layer_freq(v: dict[str, Any]) -> int | list[int]:
    """megatron moe_layer_freq: 1 when every layer is MoE, else a 0/1 list (qwen3_moe's dense layers)."""
    layers = v["num_hidden_layers"]
    step = v.get("decoder_sparse_step", 1)
    dense = v.get("mlp_only_layers", [])
    positive_int("decoder_sparse_step", step)
    if not isinstance(dense, (list, tuple)) or not all(isinstance(i, int) and 0 <= i < layers for i in dense):
        raise ValueError(f"config.json: mlp_only_layers={dense!r} must list layer indices in [0, {layers})")
    flags = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
    if not any(flags):
        raise ValueError("config.json: decoder_sparse_step/mlp_only_layers leave no MoE layer; use the dense qwen3 architecture")
    return 1 if all(flags) else flags


_MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")


def deepseek_kwargs(arch: Architecture, hf: dict, v: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(MLATransformerConfig MLA + MoE fields, spec builder options) of a DeepSeek-V2 / V3 config."""
    if v["num_key_value_heads"] != v["num_attention_heads"]:
        raise ValueError(
            f"config.json: num_key_value_heads={v['num_key_value_heads']} must equal num_attention_heads="
            f"{v['num_attention_heads']} for MLA (every head has its own k/v)"
        )
    fields = mla_config_fields({**hf, **{k: v[k] for k in _MLA_KEYS}, "rope_interleave": v.get("rope_interleave", True)})
    experts = _num_experts(arch, hf)
    for name in ("num_experts_per_tok", "moe_intermediate_size"):
        positive_int(name, v[name])
    topk, ffn = v["num_experts_per_tok"], v["moe_intermediate_size"]
    v3 = arch.model_type == "deepseek_v3"
    groups, topk_group = (v["n_group"], v["topk_group"]) if v3 or v["topk_method"] == "group_limited_greedy" else (None, None)
    _check_groups(experts, topk, groups, topk_group)
    shared, first_dense = v["n_shared_experts"], v["first_k_dense_replace"]
    for name, value in (("n_shared_experts", shared), ("first_k_dense_replace", first_dense)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"config.json: {name}={value!r} must be an integer >= 0")
    layers = v["num_hidden_layers"]
    if first_dense >= layers:
        raise ValueError(f"config.json: first_k_dense_replace={first_dense} leaves no MoE layer of {layers}; lower it")
    if not isinstance(v["norm_topk_prob"], bool):
        raise ValueError(f"config.json: norm_topk_prob={v['norm_topk_prob']!r} must be true or false")
    finite_number("routed_scaling_factor", v["routed_scaling_factor"])
    mtp = v.get("num_nextn_predict_layers", 0)
    if isinstance(mtp, bool) or not isinstance(mtp, int) or mtp < 0:
        raise ValueError(f"config.json: num_nextn_predict_layers={mtp!r} must be an integer >= 0")
    # DeepSeek-V3: sigmoid scores, expert_bias (HF e_score_correction_bias) for the choice only, groups
    # ranked by their 2 best scores, normalisation iff norm_topk_prob. DeepSeek-V2: softmax, groups ranked
    # by their best score, never renormalised. Both then multiply by routed_scaling_factor.
    routing = DeepSeekRouting("sigmoid", v["norm_topk_prob"], 2) if v3 else DeepSeekRouting("softmax", False, 1)
    return dict(
        fields,
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=ffn,
        moe_shared_expert_intermediate_size=shared * ffn or None,
        moe_layer_freq=1 if first_dense == 0 else [int(i >= first_dense) for i in range(layers)],
        moe_router_score_function=routing.score_function,
        # DeepSeek-V2 takes the top-k of softmax scores (megatron's name; our router computes it either way)
        moe_router_pre_softmax=routing.score_function == "softmax",
        moe_router_enable_expert_bias=v3,
        # megatron's default rate of the training-time bias update (DeepSeek-V3 paper: 1e-3).
        moe_router_bias_update_rate=1e-3,
        moe_router_num_groups=groups,
        moe_router_group_topk=topk_group,
        moe_router_topk_scaling_factor=float(v["routed_scaling_factor"]),
        moe_router_dtype="fp32",  # transformers keeps the gate and its logits in float32
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        # DeepSeek-V3's MTP modules; megatron's loss weight default (the paper: 0.3, then 0.1).
        mtp_num_layers=mtp,
        mtp_loss_scaling_factor=0.1,
    ), {"deepseek_routing": routing}


def _check_groups(experts: int, topk: int, groups, topk_group) -> None:
    """Group-limited routing: n_group divides the experts, topk_group <= n_group, k reachable (None, None: no groups)."""
    if groups is None and topk_group is None:
        if topk > experts:
            raise ValueError(f"config.json: num_experts_per_tok={topk} must be <= n_routed_experts={experts}")
        return
    positive_int("n_group", groups)
    positive_int("topk_group", topk_group)
    if experts % groups or topk_group > groups:
        raise ValueError(
            f"config.json: n_group={groups} must divide n_routed_experts={experts} and be >= topk_group={topk_group}"
        )
    reachable = topk_group * (experts // groups)
    if topk > reachable:
        raise ValueError(f"config.json: num_experts_per_tok={topk} must be <= topk_group x experts per group ({reachable})")


def check_deepseek_overrides(kwargs: dict[str, Any], hf: dict, routing: DeepSeekRouting) -> dict:
    """Reject router overrides DeepSeekRouter does not honour; resolve MTP (HF ``num_nextn_predict_layers``,
    override ``mtp_num_layers``, 0 = none). Returns the hf config the checkpoint maps should see."""
    model_type = hf.get("model_type")
    if kwargs["moe_router_score_function"] != routing.score_function:
        raise ValueError(
            f"from_hf_config: moe_router_score_function={kwargs['moe_router_score_function']!r} is not supported for "
            f"{model_type}; only {routing.score_function!r}"
        )
    if kwargs["moe_router_load_balancing_type"] == "sinkhorn":
        raise ValueError(
            f"from_hf_config: moe_router_load_balancing_type='sinkhorn' is not supported for {model_type}; "
            "use 'none', 'aux_loss', 'seq_aux_loss' or 'global_aux_loss'"
        )
    mtp = kwargs.get("mtp_num_layers")
    if isinstance(mtp, bool) or not isinstance(mtp, (int, type(None))) or (mtp or 0) < 0:
        raise ValueError(f"from_hf_config: mtp_num_layers={mtp!r} must be an integer >= 0 (0 or None: no MTP layer)")
    kwargs["mtp_num_layers"] = mtp or None
    return {**hf, "num_nextn_predict_layers": mtp or 0} if model_type == "deepseek_v3" or mtp else hf


def check_moe_overrides(kwargs: dict[str, Any]) -> None:
    if kwargs["moe_token_dispatcher_type"] not in ("alltoall", "allgather"):
        raise ValueError(
            f"from_hf_config: moe_token_dispatcher_type={kwargs['moe_token_dispatcher_type']!r} is not supported; "
            "use 'alltoall' (default) or 'allgather'"
        )
