"""The CPU shim of torch.cuda and the CPU replacements, unit by unit (no megatron import here;
megatron's own RNG tracker on CPU is checked in test_tensor_parallel.py)."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch

from mindspeed_models.adaptor import cpu


def test_current_device_is_a_cpu_device_usable_everywhere_megatron_uses_it():
    shim = cpu.CpuCuda()
    device = shim.current_device()
    assert device == torch.device("cpu")
    assert torch.empty(2, device=device).device.type == "cpu"
    with torch.device(device):
        assert torch.zeros(1).device.type == "cpu"


def test_streams_events_and_synchronize_are_noops():
    shim = cpu.CpuCuda()
    side = shim.Stream()
    assert shim.current_stream() is shim.default_stream()
    assert shim.current_stream() != side
    side.wait_stream(shim.current_stream())
    with shim.stream(side):
        pass
    event = side.record_event()
    event.synchronize()
    assert event.query() and side.query() and shim.Event(enable_timing=True).elapsed_time(event) == 0.0
    assert shim.synchronize() is None and shim.empty_cache() is None


def test_rng_calls_drive_the_cpu_default_generator():
    shim = cpu.CpuCuda()
    shim.manual_seed(5)
    state = shim.get_rng_state()
    first = torch.rand(3)
    shim.set_rng_state(state)
    assert torch.equal(torch.rand(3), first)
    shim.manual_seed_all(5)
    assert torch.equal(torch.rand(3), first), "seeding the 'CUDA' generator seeds what CPU ops draw from"
    assert shim.default_generators[0] is torch.default_generator
    assert shim.default_generators[torch.device("cpu")] is torch.default_generator
    assert torch.equal(shim.random.get_rng_state(), torch.get_rng_state())


def test_other_attributes_are_the_real_torch_cuda():
    shim = cpu.CpuCuda()
    assert shim.is_available is torch.cuda.is_available
    assert shim.is_available() == torch.cuda.is_available()


def test_lazy_call_runs_now():
    calls = []
    cpu.lazy_call(lambda: calls.append(1))
    assert calls == [1]


def test_host_copy_turns_split_sizes_into_numpy_and_keeps_other_values():
    sizes = torch.tensor([3, 1])
    out = cpu.host_copy(sizes, as_numpy=True)
    assert isinstance(out, np.ndarray) and out.tolist() == [3, 1]
    assert cpu.host_copy(sizes) is sizes
    assert cpu.host_copy(None, as_numpy=True) is None
    assert cpu.host_copy([1, 2], as_numpy=True) == [1, 2]


def test_process_rss_is_positive_bytes():
    assert cpu.process_rss() > 1 << 20


@dataclasses.dataclass
class _Config:
    sequence_parallel: bool


def _fake_wrapped_norm_new(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
    assert not config.sequence_parallel, "sequence parallel not supported by torch LayerNorm"
    return torch.nn.RMSNorm(hidden_size, eps=eps)


def test_norm_new_allows_sequence_parallel_and_tags_params():
    new = cpu._norm_new_factory(_fake_wrapped_norm_new).__func__
    config = _Config(sequence_parallel=True)
    norm = new(object, config, 8, 1e-6)
    assert config.sequence_parallel, "the caller's config is not modified"
    assert all(p.sequence_parallel for p in norm.parameters())
    plain = new(object, _Config(sequence_parallel=False), 8)
    assert not any(hasattr(p, "sequence_parallel") for p in plain.parameters())


def test_copy_config_leaves_the_original_alone():
    config = _Config(sequence_parallel=True)
    copy = cpu.copy_config(config, sequence_parallel=False)
    assert config.sequence_parallel and not copy.sequence_parallel


def _p2p_ops(**kwargs):  # stands in for megatron's _p2p_ops, which returns {name: request}
    return {name: f"req-{name}" for name, tensor in kwargs.items() if tensor is not None}


def _batched_p2p_ops(**kwargs):
    raise AssertionError("replaced")


def test_batched_p2p_becomes_the_ordered_ops_of_the_same_module_as_a_list():
    replacement = cpu._ordered_p2p_factory(_batched_p2p_ops)
    assert replacement(send_next=1, recv_prev=None, recv_next=2) == ["req-send_next", "req-recv_next"]


def test_te_general_gemm_is_none_only_when_unbound():
    factory = cpu.REPLACEMENTS[("transformer.moe.moe_utils", "te_general_gemm")]
    assert factory(cpu.MISSING) is None
    assert factory(len) is len


def test_tp_region_is_the_input_itself_for_a_one_rank_group_only():
    calls = []

    def megatron_region(input_, group=None):  # stands in for megatron's autograd-function wrapper
        calls.append(group)
        return input_.view_as(input_)

    region = cpu._one_rank_region_factory(megatron_region)
    x = torch.randn(3, 2, requires_grad=True)
    one, two = types.SimpleNamespace(size=lambda: 1), types.SimpleNamespace(size=lambda: 2)
    assert region(x, one) is x and calls == []
    assert region(x, two) is not x and region(x) is not x and calls == [two, None]
    assert region.__wrapped__ is megatron_region
    with pytest.raises(cpu.SeamDrift, match="seams.py"):
        cpu._one_rank_region_factory(cpu.MISSING)
