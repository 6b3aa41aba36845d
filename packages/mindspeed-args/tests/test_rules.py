"""Cross-parameter rules (mindspeed_args.rules.RULES): one failing and one passing launch per rule.

Each CASES entry is (rule_id, failing_overrides, passing_overrides, world_size). The overrides sit
on top of the megatron schema defaults and go through ``derive`` like a real launch. A failing case
must trip exactly its own rule and a passing case, a small change of the failing one, must trip
none. The context-parallel cases follow seed 000 sections 25-26.
"""

from __future__ import annotations

import pytest

from mindspeed_args.derive import derive
from mindspeed_args.rules import RULES
from mindspeed_args.rules.base import DERIVED, Rule, RuleReadError
from mindspeed_args.schema import load_schema
from mindspeed_args.validate import Resolved, validate, value_violations
from mindspeed_args.values import check_value

RULES_BY_ID = {r.id: r for r in RULES}


def values_for(overrides, dialect="megatron", world_size=None):
    v = {p.name: p.default_for(dialect) for p in load_schema().params.values()}
    v.update(overrides)
    derive(v, dialect, world_size)
    return v


def fired(values) -> set[str]:
    return {v.rule for r in RULES if (v := r.check(values))}


def case(rule_id, fail, change, world_size=None):
    """Table row whose passing overrides are the failing ones with ``change`` applied."""
    return (rule_id, fail, {**fail, **change}, world_size)


def cp(algo, size, **extra):
    """A realistic context-parallel launch: mcore model, 8 heads, 4k sequence."""
    return {"use_mcore_models": True, "num_attention_heads": 8, "seq_length": 4096,
            "context_parallel_size": size, "context_parallel_algo": algo, **extra}


ULY, RING, HYB = "ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo"
ADA, HADA = "adaptive_cp_algo", "hybrid_adaptive_cp_algo"
TP, PP = "tensor_model_parallel_size", "pipeline_model_parallel_size"
VPP = "num_layers_per_virtual_pipeline_stage"
GRAN, METHOD = "recompute_granularity", "recompute_method"
RAF = "recompute_activation_function"
GENERAL = {"cp_attention_mask_type": "general", "micro_batch_size": 2}
MLA_SIZES = {"kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128}
FSDP2 = {"fsdp2_config_path": "fsdp2_config.yaml", "ckpt_format": "torch_dcp"}
GRPO = {"rlhf_type": "grpo"}
ALGO_PREFIX = {ULY: "ulysses", RING: "ring", HYB: "hybrid", ADA: "adaptive", HADA: "hybrid-adaptive"}

CASES = [
    # --- batch and parallel layout
    case("parallel.world-size", {TP: 4, "num_attention_heads": 8}, {TP: 2}, world_size=6),
    case("batch.global-divisible", {"global_batch_size": 100, "micro_batch_size": 2},
         {"global_batch_size": 128}, world_size=8),
    case("parallel.sequence-parallel-needs-tp", {"sequence_parallel": True, TP: 1}, {TP: 2}),
    case("parallel.heads-divisible-by-tp", {"num_attention_heads": 12, TP: 8}, {TP: 4}),
    case("parallel.vpp-exclusive", {PP: 4, "num_layers": 32, VPP: 2, "num_virtual_stages_per_pipeline_rank": 4},
         {"num_virtual_stages_per_pipeline_rank": None}),
    case("parallel.vpp-needs-pp", {"num_layers": 16, VPP: 2, PP: 1}, {PP: 2}),
    case("parallel.layers-divisible-by-pp", {"num_layers": 30, PP: 4}, {"num_layers": 32}),
    case("parallel.overlap-param-gather-needs-distopt", {"overlap_param_gather": True},
         {"use_distributed_optimizer": True}),
    case("parallel.overlap-grad-reduce-needs-distopt", {"overlap_grad_reduce": True},
         {"use_distributed_optimizer": True}),
    case("parallel.first-last-stage-needs-pp", {"num_layers": 30, "decoder_first_pipeline_num_layers": 14, PP: 1},
         {PP: 2}),
    case("parallel.layout-exclusive", {PP: 2, "pipeline_model_parallel_layout": "Et*3|t*3L",
                                       "decoder_first_pipeline_num_layers": 3},
         {"decoder_first_pipeline_num_layers": None}),
    case("parallel.expert-parallel-needs-experts", {"expert_model_parallel_size": 4, "num_experts": 6},
         {"num_experts": 8}),
    case("precision.fp16-bf16-exclusive", {"fp16": True, "bf16": True}, {"bf16": False}),
    case("lr.warmup-exclusive", {"lr_warmup_fraction": 0.01, "lr_warmup_iters": 100}, {"lr_warmup_iters": 0}),
    # --- context parallelism (seed 000 §25)
    case("cp.mcore", cp(RING, 2, use_mcore_models=False), {"use_mcore_models": True}),
    case("cp.ulysses.seq-length", cp(ULY, 4, seq_length=102), {"seq_length": 104}),
    case("cp.ulysses.heads", cp(ULY, 4, num_attention_heads=6), {"num_attention_heads": 8}),
    case("cp.ulysses.query-groups-tp", cp(ULY, 2, **{TP: 4}, group_query_attention=True, num_query_groups=2),
         {"num_query_groups": 4}),
    case("cp.ulysses.query-groups", cp(ULY, 4, group_query_attention=True, num_query_groups=2,
                                       kv_head_repeat_before_uly_alltoall=False),
         {"kv_head_repeat_before_uly_alltoall": True}),
    case("cp.ring.seq-length", cp(RING, 4, seq_length=100), {"seq_length": 104}),
    case("cp.ring.window", cp(RING, 4, cp_window_size=3), {"cp_window_size": 2}),
    case("cp.ring.general-mask", cp(RING, 2, **GENERAL), {"micro_batch_size": 1}),
    case("cp.hybrid.degree-required", cp(HYB, 4), {"ulysses_degree_in_cp": 2}),
    case("cp.hybrid.degree-divides", cp(HYB, 4, num_attention_heads=12, ulysses_degree_in_cp=3),
         {"ulysses_degree_in_cp": 2}),
    case("cp.hybrid.seq-length", cp(HYB, 4, ulysses_degree_in_cp=2, seq_length=100), {"seq_length": 104}),
    case("cp.hybrid.window", cp(HYB, 8, ulysses_degree_in_cp=2, cp_window_size=4), {"cp_window_size": 2}),
    case("cp.hybrid.heads", cp(HYB, 4, ulysses_degree_in_cp=4, num_attention_heads=12, **{TP: 2}),
         {"num_attention_heads": 16}),
    case("cp.hybrid.general-mask", cp(HYB, 4, ulysses_degree_in_cp=2, **GENERAL), {"micro_batch_size": 1}),
    case("cp.adaptive.seq-length", cp(ADA, 4, seq_length=102), {"seq_length": 104}),
    case("cp.adaptive.general-mask", cp(ADA, 2, **GENERAL), {"micro_batch_size": 1}),
    case("cp.hybrid-adaptive.degree-required", cp(HADA, 4), {"ulysses_degree_in_cp": 2}),
    case("cp.hybrid-adaptive.degree-divides", cp(HADA, 4, num_attention_heads=12, ulysses_degree_in_cp=3),
         {"ulysses_degree_in_cp": 2}),
    case("cp.hybrid-adaptive.heads", cp(HADA, 4, ulysses_degree_in_cp=4, num_attention_heads=12, **{TP: 2}),
         {"num_attention_heads": 16}),
    case("cp.hybrid-adaptive.seq-length", cp(HADA, 4, ulysses_degree_in_cp=2, seq_length=102),
         {"seq_length": 104}),
    case("cp.hybrid-adaptive.general-mask", cp(HADA, 4, ulysses_degree_in_cp=2, **GENERAL),
         {"micro_batch_size": 1}),
    case("cp.sliding-window", cp(RING, 2, sliding_window=4096), {"context_parallel_size": 1}),
    # --- recompute and swap (seed 000 §26)
    case("recompute.layers-per-pp-rank", {PP: 2, "num_layers": 16, VPP: 2, "enable_recompute_layers_per_pp_rank": True,
                                          GRAN: "full", METHOD: "uniform"}, {METHOD: "block"}),
    case("recompute.activation.not-uniform", {RAF: True, GRAN: "full", METHOD: "uniform"}, {METHOD: "block"}),
    case("recompute.activation.not-selective", {RAF: True, GRAN: "selective"}, {GRAN: None}),
    case("recompute.norm.not-uniform", {"recompute_norm": True, "use_mcore_models": True, GRAN: "full",
                                        METHOD: "uniform"}, {METHOD: "block"}),
    case("recompute.norm.not-selective", {"recompute_norm": True, "use_mcore_models": True, GRAN: "selective"},
         {GRAN: None}),
    case("recompute.norm.mcore", {"recompute_norm": True, "use_mcore_models": False}, {"use_mcore_models": True}),
    case("recompute.method-needs-full", {METHOD: "block"}, {GRAN: "full"}),
    case("recompute.num-layers-needs-full", {GRAN: "selective", "recompute_num_layers": 4},
         {GRAN: "full", METHOD: "uniform"}),
    case("recompute.full-needs-method", {GRAN: "full", "recompute_num_layers": 4}, {METHOD: "uniform"}),
    case("recompute.activation-num-layers-block", {"recompute_activation_function_num_layers": 2}, {RAF: True}),
    case("swap.modules-need-swap-attention", {"swap_modules": "input_layernorm,self_attention"},
         {"swap_attention": True}),
    # --- MindSpeed features
    case("tp2d.grid", {TP: 8, "num_attention_heads": 16, "tp_2d": True, "tp_x": 2, "tp_y": 2}, {"tp_y": 4}),
    case("tp2d.sequence-parallel", {TP: 4, "tp_2d": True, "tp_x": 2, "tp_y": 2, "sequence_parallel": True},
         {"sequence_parallel": False}),
    case("tp2d.no-expert-parallel", {TP: 2, "tp_2d": True, "tp_x": 1, "tp_y": 2, "num_experts": 4,
                                      "expert_model_parallel_size": 2}, {"expert_model_parallel_size": 1}),
    case("tp2d.ndmm-exclusive", {TP: 4, "tp_2d": True, "tp_x": 2, "tp_y": 2, "use_nd_matmul": True},
         {"use_nd_matmul": False}),
    case("tp2d.options-need-tp2d", {TP: 4, "tp_x": 2, "tp_y": 2, "enable_overlap_ag_with_matmul": True},
         {"tp_2d": True}),
    case("ndmm.sizes-need-ndmm", {TP: 4, "nd1_dim1_size": 2}, {"use_nd_matmul": True}),
    case("ndmm.sizes-divide-tp", {TP: 4, "use_nd_matmul": True, "nd1_dim1_size": 3}, {"nd1_dim1_size": 2}),
    case("dualpipe.dw-detach", {PP: 2, "num_layers": 16, "dualpipev_dw_detach": True},
         {"schedules_method": "dualpipev"}),
    case("gc.interval-needs-manual-gc", {"manual_gc_interval": 10}, {"manual_gc": True}),
    case("dualpipe.needs-pp", {"schedules_method": "dualpipev", "num_layers": 16, PP: 1}, {PP: 2}),
    case("dualpipe.layers", {"schedules_method": "dualpipev", PP: 4, "num_layers": 20}, {"num_layers": 24}),
    case("dualpipe.vpp-exclusive", {"schedules_method": "dualpipev", PP: 2, "num_layers": 16, VPP: 2}, {VPP: None}),
    case("mla.needs-flag", {**MLA_SIZES, "v_head_dim": 128}, {"multi_head_latent_attention": True}),
    case("mla.sizes", {**MLA_SIZES, "multi_head_latent_attention": True}, {"v_head_dim": 128}),
    case("moe.shared-expert-gate-dim", {"shared_expert_gate": True, "hidden_size": 4096,
                                        "shared_expert_gate_output_dimension": 2},
         {"shared_expert_gate_output_dimension": 1}),
    case("moe.zero-memory-layers", {"moe_zero_memory": "level0", "moe_zero_memory_num_layers": 2},
         {"moe_zero_memory": "level1"}),
    case("moe.deepep-needs-flex", {"moe_enable_deepep": True, "moe_token_dispatcher_type": "alltoall"},
         {"moe_token_dispatcher_type": "flex"}),
    case("moe.pad-needs-capacity", {"moe_pad_expert_input_to_capacity": True}, {"moe_expert_capacity_factor": 1.0}),
    case("moe.shared-overlap-needs-shared", {"moe_shared_expert_overlap": True},
         {"moe_shared_expert_intermediate_size": 1024}),
    case("moe.alltoall-overlap", {"moe_alltoall_overlap_comm": True, "moe_token_dispatcher_type": "allgather"},
         {"moe_token_dispatcher_type": "alltoall"}),
    case("moe.allgather-overlap", {"moe_allgather_overlap_comm": True, "moe_token_dispatcher_type": "alltoall"},
         {"moe_token_dispatcher_type": "allgather"}),
    case("fusion.swiglu", {"use_fused_swiglu": True}, {"swiglu": True}),
    case("fusion.rmsnorm", {"use_fused_rmsnorm": True, "normalization": "LayerNorm"}, {"normalization": "RMSNorm"}),
    case("fusion.ring-update-needs-ring", cp(ULY, 2, use_fused_ring_attention_update=True),
         {"context_parallel_algo": RING}),
    case("alibi.options", {"square_alibi_mask": True, "position_embedding_type": "rope"},
         {"position_embedding_type": "alibi"}),
    case("alibi.fill-neg-inf", {"fill_neg_inf": True, "position_embedding_type": "rope"},
         {"position_embedding_type": "alibi"}),
    case("mtp.scaling-needs-layers", {"recompute_mtp_layer": True}, {"mtp_num_layers": 1}),
    case("swap.optimizer-times", {"swap_optimizer": True}, {"use_distributed_optimizer": True}),
    case("fsdp2-mm.no-megatron-parallel", {**FSDP2, TP: 2}, {TP: 1}),
    case("fsdp2-mm.ckpt-format", {**FSDP2, "ckpt_format": "torch_dist"}, {"ckpt_format": "torch_dcp"}),
    # --- data, FSDP2 and profiling (seed 001)
    case("data.eval-dataset-vs-val-size", {"dataset": "alpaca_en", "eval_dataset": "alpaca_eval", "val_size": 0.05},
         {"val_size": 0.0}),
    case("data.train-on-prompt-vs-mask-history", {"train_on_prompt": True, "mask_history": True},
         {"mask_history": False}),
    case("data.streaming-vs-max-samples", {"dataset": "alpaca_en", "streaming": True, "max_samples": 1000},
         {"max_samples": None}),
    case("data.streaming-val-size-integer", {"dataset": "alpaca_en", "streaming": True, "val_size": 0.05},
         {"val_size": 500.0}),
    case("data.val-size-needs-dataset", {"val_size": 0.05}, {"dataset": "alpaca_en"}),
    case("data.val-size-range", {"dataset": "alpaca_en", "val_size": 1.5}, {"val_size": 0.15}),
    case("data.interleave-probs-need-interleave", {"interleave_probs": "0.7,0.3", "mix_strategy": "concat"},
         {"mix_strategy": "interleave_under"}),
    case("data.desc-init-needs-config", {"init_special_tokens": "desc_init"},
         {"new_special_tokens_config": "special_tokens.yaml"}),
    case("fsdp.modules-non-empty", {"fsdp_modules": []}, {"fsdp_modules": ["model.layers.{}"]}),
    case("profile.step-window", {"profile": True, "profile_step_start": 10, "profile_step_end": 5},
         {"profile_step_end": 12}),
    # --- RLHF, export, optimizer and environment (seed 003)
    case("grpo.generation-batch-exclusive", {**GRPO, "generation_batch_size": 64, "steps_per_generation": 4},
         {"steps_per_generation": 1}),
    case("grpo.num-generations", {**GRPO, "num_generations": 1}, {"num_generations": 2}),
    case("grpo.generation-batch-divisible", {**GRPO, "global_batch_size": 12, "num_generations": 8},
         {"global_batch_size": 16}),
    case("grpo.epsilon-high", {"grpo_epsilon": 0.2, "epsilon_high": 0.1}, {"epsilon_high": 0.28}),
    case("grpo.vllm-server-address", {**GRPO, "vllm_mode": "server"}, {"vllm_server_host": "127.0.0.1"}),
    case("gkd.teacher-required", {"rlhf_type": "gkd"}, {"teacher_model": "Qwen/Qwen2.5-7B-Instruct"}),
    case("export.direction", {"to_mcore": True, "to_hf": True}, {"to_hf": False}),
    case("optimizer.offload-needs-precision-aware", {"optimizer_cpu_offload": True},
         {"use_precision_aware_optimizer": True}),
    case("optimizer.sgd-momentum", {"sgd_momentum": 0.95, "optimizer": "adam"}, {"optimizer": "sgd"}),
    case("env.device-connections-sequence-parallel", {TP: 2, "sequence_parallel": True,
                                                      "cuda_device_max_connections": 8},
         {"cuda_device_max_connections": 1}),
]



def _ids(rows):
    return [row[0] for row in rows]


@pytest.mark.parametrize("rule_id, fail, ok, world_size", CASES, ids=_ids(CASES))
def test_rule_fails_then_passes(rule_id, fail, ok, world_size):
    rule = RULES_BY_ID[rule_id]
    bad = values_for(fail, world_size=world_size)
    violation = rule.check(bad)
    assert violation is not None, f"{rule_id} did not fire on {fail}"
    assert violation.rule == rule_id
    changed = {k for k in ok if ok[k] != fail.get(k)}
    assert changed & set(rule.reads) <= set(violation.params), "the violation should name what to fix"
    assert set(violation.params) & set(fail), "the violation should name a parameter the user set"
    assert violation.constraint and violation.fix and rule_id in violation.one_line()
    assert fired(bad) == {rule_id}, "the failing case should trip only its own rule"

    good = values_for(ok, world_size=world_size)
    assert rule.check(good) is None
    assert fired(good) == set(), "the passing case should be clean"


def test_passing_change_is_small():
    for rule_id, fail, ok, _ in CASES:
        changed = {k for k in set(fail) | set(ok) if fail.get(k) != ok.get(k)}
        assert 1 <= len(changed) <= 2, (rule_id, changed)


@pytest.mark.parametrize("rule_id, fail, ok, world_size", CASES, ids=_ids(CASES))
def test_case_values_are_valid_schema_values(rule_id, fail, ok, world_size):
    """Cases use real parameters with values of the right type, choice and range."""
    schema = load_schema()
    for overrides in (fail, ok):
        for name, value in overrides.items():
            assert name in schema, name
            assert check_value(schema[name].type, value) is None, (name, value)
        values = values_for(overrides, world_size=world_size)
        problems = {n for v in value_violations(schema, Resolved("megatron", values, {}, {}))
                    if v.rule != "value.required" for n in v.params if n in overrides}
        assert problems == set(), (rule_id, problems)


def test_cases_cover_every_rule_and_ids_are_unique():
    ids = [r.id for r in RULES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    case_ids = _ids(CASES)
    assert len(case_ids) == len(set(case_ids))
    assert set(case_ids) == set(ids)


def test_rule_reads_are_parameters_or_derived():
    schema = load_schema()
    for rule in RULES:
        unknown = [n for n in rule.reads if n not in schema and n not in DERIVED]
        assert not unknown, (rule.id, unknown)
        assert set(rule.blame) <= set(rule.reads), rule.id


def test_derived_values_are_added_by_derive():
    values = values_for(cp(HYB, 8, ulysses_degree_in_cp=2), world_size=16)
    assert {n: values[n] for n in DERIVED} == {"world_size": 16, "data_parallel_size": 2, "num_micro_batches": None,
                                              "ulysses_degree": 2, "ring_degree": 4}


def test_reading_an_undeclared_parameter_raises():
    sneaky = Rule(id="test.sneaky", source="test", reads=("seq_length",),
                  applies=lambda v: True, holds=lambda v: v.seq_length == v.num_attention_heads,
                  constraint="c", fix="f")
    with pytest.raises(RuleReadError, match="num_attention_heads"):
        sneaky.check(values_for({"seq_length": 4096, "num_attention_heads": 8}))


# --- seed 000 §25 boundaries, beyond the one case per rule


@pytest.mark.parametrize("algo, factor", [(ULY, 1), (RING, 2), (HYB, 2), (ADA, 1), (HADA, 1)])
def test_seq_length_multiple_per_algorithm(algo, factor):
    """§25.4-8: ring algorithms need a multiple of 2 x cp, the others a multiple of cp."""
    extra = {"ulysses_degree_in_cp": 2} if algo in (HYB, HADA) else {}
    rid = f"cp.{ALGO_PREFIX[algo]}.seq-length"
    assert fired(values_for(cp(algo, 4, seq_length=4100, **extra))) == ({rid} if factor == 2 else set())
    assert fired(values_for(cp(algo, 4, seq_length=4098, **extra))) == {rid}
    assert fired(values_for(cp(algo, 4, seq_length=4104, **extra))) == set()


@pytest.mark.parametrize("window, ok", [(0, False), (1, True), (2, True), (3, False), (4, False), (8, False)])
def test_ring_window_in_range_and_divides_cp(window, ok):
    """§25.5: cp_window_size in [1, cp) and cp a multiple of it (cp = 4)."""
    got = fired(values_for(cp(RING, 4, cp_window_size=window)))
    assert got == (set() if ok else {"cp.ring.window"})


@pytest.mark.parametrize("window, ok", [(1, True), (2, True), (3, False), (4, False)])
def test_hybrid_window_uses_ring_degree(window, ok):
    """§25.6: the window is bounded by the ring degree (cp 8 / ulysses 2 = 4), not by cp."""
    got = fired(values_for(cp(HYB, 8, ulysses_degree_in_cp=2, cp_window_size=window)))
    assert got == (set() if ok else {"cp.hybrid.window"})


@pytest.mark.parametrize("algo", [ULY, RING, HYB, ADA, HADA])
def test_general_mask_needs_micro_batch_one(algo):
    """§25.5-8: general masks need micro_batch_size 1; §25.4 (ulysses) has no such limit."""
    extra = {"ulysses_degree_in_cp": 2} if algo in (HYB, HADA) else {}
    got = {r for r in fired(values_for(cp(algo, 4, **GENERAL, **extra))) if r.endswith("general-mask")}
    assert len(got) == (0 if algo == ULY else 1)
    assert not fired(values_for(cp(algo, 4, **{**GENERAL, "micro_batch_size": 1}, **extra)))


def test_no_context_parallel_turns_off_cp_only_options():
    """§25.1-2: without CP the ulysses/ring options are forced off; with CP flash attention is on."""
    off = values_for({"use_fused_ring_attention_update": True, "kv_head_repeat_before_uly_alltoall": True})
    assert off["use_fused_ring_attention_update"] is False and off["kv_head_repeat_before_uly_alltoall"] is False
    assert not fired(off)
    assert values_for(cp(RING, 2))["use_flash_attn"] is True


def test_acceptance_example_ring_seq_length():
    argv = ["--context-parallel-size", "4", "--context-parallel-algo", "megatron_cp_algo", "--seq-length", "100",
            "--num-attention-heads", "8", "--use-mcore-models"]
    report = validate(argv, dialect="megatron", environ={})
    hits = [v for v in report.violations if v.rule == "cp.ring.seq-length"]
    assert len(hits) == 1
    line = hits[0].one_line()
    assert "seq_length" in line and "8" in line and "104" in line
