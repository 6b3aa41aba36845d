"""Values computed once from the parameters, reported by ``validate`` as notices.

Derived sizes (world/data-parallel size, micro-batch count, ulysses/ring degrees) become
pseudo-parameters that rules can read; a few parameters are forced the way MindSpeed forces them
(flash attention under CP, default swap modules, neat packing implying packing, FSDP2's compound
``recompute`` flag and its global batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mindspeed_args.values import same

MCORE_SWAP_MODULES = "input_layernorm,self_attention,pre_cross_attn_layernorm"
LEGACY_SWAP_MODULES = "input_norm,self_attention,post_attention_norm"


@dataclass(frozen=True)
class Notice:
    """A value set or computed for the user: name, value, and why."""

    name: str
    value: Any
    reason: str

    def one_line(self) -> str:
        return f"{self.name} = {self.value}: {self.reason}"


def _size(values: dict, name: str) -> int:
    return values.get(name) or 1


def data_parallel_size(values: dict, world_size: int | None) -> int | None:
    """world size / (TP x PP x CP), or None when unknown or not a whole number."""
    model = _size(values, "tensor_model_parallel_size") * _size(values, "pipeline_model_parallel_size") \
        * _size(values, "context_parallel_size")
    return world_size // model if world_size and world_size % model == 0 else None


def derive(values: dict[str, Any], dialect: str, world_size: int | None) -> list[Notice]:
    """Update ``values`` in place with forced and derived values; return the notices."""
    notes: list[Notice] = []

    def force(name: str, value: Any, reason: str) -> None:
        if name in values and not same(values[name], value):
            values[name] = value
            notes.append(Notice(name, value, reason))

    _fsdp2_compounds(values, dialect, force)
    _context_parallel(values, force)
    if values.get("swap_attention") and values.get("swap_modules") is None:
        mods = MCORE_SWAP_MODULES if values.get("use_mcore_models") else LEGACY_SWAP_MODULES
        force("swap_modules", mods, "swap_attention without swap_modules uses these defaults (seed 000 §26.4)")
    if values.get("neat_pack"):
        force("pack", True, "neat packing implies packing (seed 001)")
    notes.extend(_sizes(values, dialect, world_size))
    return notes


def _fsdp2_compounds(values: dict, dialect: str, force) -> None:
    if dialect != "fsdp2" or not values.get("recompute"):
        return
    # FSDP2's recompute checkpoints every module in fsdp_recompute_modules: Megatron's
    # full/uniform recompute of one layer per group (seed 001 mapping table).
    force("recompute_granularity", "full", "FSDP2 recompute=true is full recompute")
    force("recompute_method", "uniform", "FSDP2 recompute=true recomputes every layer")
    force("recompute_num_layers", 1, "FSDP2 recompute=true recomputes every layer")


def _context_parallel(values: dict, force) -> None:
    if _size(values, "context_parallel_size") > 1:
        force("use_flash_attn", True, "context parallelism always uses flash attention (seed 000 §25.2)")
    else:
        force("kv_head_repeat_before_uly_alltoall", False, "no context parallelism (seed 000 §25.1)")
        force("use_fused_ring_attention_update", False, "no context parallelism (seed 000 §25.1)")


def _sizes(values: dict, dialect: str, world_size: int | None) -> list[Notice]:
    notes = []
    cp = _size(values, "context_parallel_size")
    algo = values.get("context_parallel_algo")
    uly = {"ulysses_cp_algo": cp}.get(algo, values.get("ulysses_degree_in_cp"))
    values["ulysses_degree"] = uly if algo in ("ulysses_cp_algo", "hybrid_cp_algo", "hybrid_adaptive_cp_algo") else None
    values["ring_degree"] = cp // uly if algo == "hybrid_cp_algo" and uly and cp % uly == 0 else None
    values["world_size"] = world_size
    dp = values["data_parallel_size"] = data_parallel_size(values, world_size)
    if dp is not None:
        notes.append(Notice("data_parallel_size", dp, f"world size {world_size} / (TP x PP x CP = {world_size // dp})"))
    if dialect == "fsdp2" and dp is not None and values.get("micro_batch_size"):
        # Seed 001 maps global batch = devices x per-device batch x accumulation. Devices that
        # share a TP/CP group see the same samples, so the data-parallel size is the right factor;
        # it equals the device count when tp_size = cp_size = 1.
        accum = values.get("gradient_accumulation_steps") or 1
        gbs = dp * values["micro_batch_size"] * accum
        values["global_batch_size"] = gbs
        why = f"data-parallel {dp} x per-device {values['micro_batch_size']} x accumulation {accum}"
        notes.append(Notice("global_batch_size", gbs, why))
    gbs, mbs = values.get("global_batch_size"), values.get("micro_batch_size")
    n = gbs // (mbs * dp) if dp and gbs and mbs and gbs % (mbs * dp) == 0 else None
    values["num_micro_batches"] = n
    if n is not None:
        notes.append(Notice("num_micro_batches", n, f"global batch {gbs} / (micro batch {mbs} x data-parallel {dp})"))
    return notes
