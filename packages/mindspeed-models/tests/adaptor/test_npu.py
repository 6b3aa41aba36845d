"""The NPU mapping, without hardware: the table covers every shimmed call, and install("npu")
against a fake torch_npu wires each seam to torch.npu's counterpart (what the real kernels then do
is not testable here). Runs in a fresh process: it registers the 'npu' device name."""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from mindspeed_kernels.testing import run_world
from mindspeed_models import adaptor
from mindspeed_models.adaptor import npu
from mindspeed_models.adaptor.seams import SHIM_CALLS

pytestmark = [pytest.mark.xdist_group("gloo"), pytest.mark.timeout(300)]


def _fake_torch_npu() -> types.SimpleNamespace:
    """torch.npu's documented names, each a distinct sentinel object (callables where called)."""
    fake = types.SimpleNamespace(**{name: object() for name in npu.NPU_CALLS.values() if name})
    fake.current_device = lambda: 0
    fake.default_generators = (torch.Generator(),)
    fake._lazy_call = lambda callback: callback()
    fake.is_available = lambda: True
    return fake


def test_npu_table_covers_every_shimmed_call():
    assert set(npu.NPU_CALLS) == set(SHIM_CALLS)
    shim = npu.NpuCuda(_fake_torch_npu())
    for cuda_name in SHIM_CALLS:
        assert cuda_name in vars(shim) or cuda_name in vars(npu.NpuCuda), cuda_name


def _npu_world(rank: int) -> None:
    with pytest.raises(RuntimeError, match="needs torch_npu"):
        adaptor.install("npu")
    assert adaptor.installed() is None

    fake = _fake_torch_npu()
    sys.modules["torch_npu"] = types.ModuleType("torch_npu")
    torch.npu = fake
    torch.utils.rename_privateuse1_backend("npu")
    adaptor.install("npu")
    assert adaptor.installed() == "npu"

    module = importlib.import_module
    mapped = module("megatron.core.tensor_parallel.mappings").torch.cuda
    assert mapped.current_device() == torch.device("npu", 0)
    for cuda_name, npu_name in npu.NPU_CALLS.items():
        if npu_name:
            assert getattr(mapped, cuda_name) is getattr(fake, npu_name), cuda_name
    assert mapped.default_generators[torch.device("npu", 0)] is fake.default_generators[0]
    assert mapped.is_available is fake.is_available, "unlisted names pass through to torch.npu"
    assert module("megatron.core.tensor_parallel.random")._lazy_call is fake._lazy_call

    utils = module("megatron.core.transformer.utils")
    assert "npu" in utils.get_default_causal_mask.__code__.co_consts
    clip = module("megatron.core.optimizer.clip_grads").clip_grad_by_total_norm_fp32.__code__.co_consts
    assert "torch.npu.FloatTensor" in clip and "npu" in clip
    language = module("megatron.core.models.common.language_module.language_module").LanguageModule
    assert "npu" in language.setup_embeddings_and_output_layer.__code__.co_names
    p2p = module("megatron.core.pipeline_parallel.p2p_communication")
    assert p2p._batched_p2p_ops.__module__ == p2p.__name__, "the gloo-only p2p seam is not applied on npu"
    assert len(adaptor.applied()) == len(adaptor.seams_for("npu"))


def test_install_npu_maps_each_seam_to_torch_npu():
    run_world(_npu_world, 1, timeout_s=60)
