"""CPConfig: MindSpeed's names and the rules that need only these values (seed 000 sections 12, 25)."""

from __future__ import annotations

import pytest

from mindspeed_parallel.cp.config import ALGORITHMS, CPConfig


def test_defaults_are_the_seed_defaults():
    config = CPConfig()
    assert (config.algo, config.mask_type, config.window_size, config.kv_head_repeat) == ("ulysses_cp_algo", "causal", 1, True)
    assert not (config.send_recv_overlap or config.mask_on_cpu)


@pytest.mark.parametrize(
    "algo, ulysses, ring, layout",
    [("ulysses_cp_algo", None, 1, "contiguous"), ("megatron_cp_algo", None, 8, "zigzag"),
     ("hybrid_cp_algo", 2, 4, "hybrid"), ("adaptive_cp_algo", None, 1, "adaptive"),
     ("hybrid_adaptive_cp_algo", 4, 1, "adaptive")],
)  # fmt: skip
def test_ring_degree_and_layout(algo, ulysses, ring, layout):
    config = CPConfig(algo=algo, size=8, ulysses_degree=ulysses)
    assert (config.ring_degree, config.layout) == (ring, layout)
    assert algo in ALGORITHMS


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(algo="ring"), r"context_parallel_algo='ring': choose one of"),
        (dict(mask_type="full"), r"cp_attention_mask_type='full'"),
        (dict(size=0), r"context_parallel_size=0 must be a positive integer"),
        (dict(algo="hybrid_cp_algo", size=4), r"ulysses_degree_in_cp=None: hybrid_cp_algo needs a divisor of"),
        (dict(algo="hybrid_cp_algo", size=4, ulysses_degree=3), r"ulysses_degree_in_cp=3"),
        (dict(algo="megatron_cp_algo", size=4, window_size=4), r"cp_window_size=4 must divide the ring degree 4 and be smaller"),
        (dict(algo="megatron_cp_algo", size=4, window_size=3), r"cp_window_size=3"),
        (dict(algo="ulysses_cp_algo", size=4, window_size=2), r"cp_window_size=2 must divide the ring degree 1"),
    ],
)  # fmt: skip
def test_invalid_settings_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CPConfig(**kwargs)


def test_double_ring_window_is_accepted():
    assert CPConfig(algo="megatron_cp_algo", size=4, window_size=2).window_size == 2
    assert CPConfig(algo="hybrid_cp_algo", size=8, ulysses_degree=2, window_size=2).ring_degree == 4
