"""Which context-parallel algorithm runs, with its options: one frozen, validated dataclass.

The names are MindSpeed's (``--context-parallel-algo`` and the options of seed 000 section 12);
the checks are the ones that need nothing but these values (sequence lengths and head counts are
checked where the tensors are, by the algorithms themselves).
"""

from __future__ import annotations

from dataclasses import dataclass

ULYSSES, RING, HYBRID = "ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo"
ADAPTIVE, HYBRID_ADAPTIVE = "adaptive_cp_algo", "hybrid_adaptive_cp_algo"
ALGORITHMS = (ULYSSES, RING, HYBRID, ADAPTIVE, HYBRID_ADAPTIVE)
MASK_TYPES = ("causal", "general")

# How each algorithm lays the global sequence out over the cp ranks (see `mindspeed_parallel.cp.data`).
LAYOUTS = {ULYSSES: "contiguous", RING: "zigzag", HYBRID: "hybrid", ADAPTIVE: "adaptive", HYBRID_ADAPTIVE: "adaptive"}


@dataclass(frozen=True)
class CPConfig:
    """Context parallelism over ``size`` ranks.

    ``algo``: one of :data:`ALGORITHMS`. ``ulysses_degree``: ranks of the all-to-all part for the
    hybrid algorithms (``ulysses_degree_in_cp``; the ring part is ``size // ulysses_degree``).
    ``mask_type``: ``cp_attention_mask_type`` ("causal", or "general": an explicit [S, S] mask).
    ``window_size``: ``cp_window_size``, the inner ring of the double ring (1: single ring).
    ``send_recv_overlap``: post the next ring step's send/recv before computing the current one.
    ``kv_head_repeat``: ``kv_head_repeat_before_uly_alltoall`` (repeat kv heads for GQA/MQA when
    the kv heads do not divide over the ulysses ranks). ``mask_on_cpu``: keep the full general
    mask in host memory and move only each block's slice. The ``adaptive_*`` flags are the
    ``adaptive_cp_*`` options of the adaptive algorithms.
    """

    algo: str = ULYSSES
    size: int = 1
    ulysses_degree: int | None = None
    mask_type: str = "causal"
    window_size: int = 1
    send_recv_overlap: bool = False
    kv_head_repeat: bool = True
    mask_on_cpu: bool = False
    adaptive_without_coarse: bool = False
    adaptive_dynamic_attn_mask: bool = False
    adaptive_only_reschedule: bool = False
    adaptive_manually_set_mask_list: bool = False

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            raise ValueError(f"context_parallel_algo={self.algo!r}: choose one of {', '.join(ALGORITHMS)}")
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"cp_attention_mask_type={self.mask_type!r}: choose 'causal' or 'general'")
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"context_parallel_size={self.size!r} must be a positive integer")
        if self.algo in (HYBRID, HYBRID_ADAPTIVE):
            u = self.ulysses_degree
            if u is None or u < 1 or self.size % u:
                raise ValueError(f"ulysses_degree_in_cp={u!r}: {self.algo} needs a divisor of context_parallel_size={self.size}")
        ring = self.ring_degree
        if self.window_size < 1 or ring % self.window_size or (self.window_size >= ring > 1):
            raise ValueError(f"cp_window_size={self.window_size} must divide the ring degree {ring} and be smaller "
                             "than it; 1 disables the double ring")  # fmt: skip

    @property
    def ring_degree(self) -> int:
        """Ranks of the ring part: all of them for ring, ``size // ulysses_degree`` for hybrid, else 1."""
        if self.algo == RING:
            return self.size
        if self.algo == HYBRID:
            return self.size // self.ulysses_degree
        return 1

    @property
    def layout(self) -> str:
        """How the global sequence is split over the cp ranks: see :data:`LAYOUTS`."""
        return LAYOUTS[self.algo]
