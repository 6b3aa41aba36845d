"""The seam table is consistent with itself, with the device modules, and with megatron-core's
installed source (read as text, so this file never imports megatron)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from mindspeed_models.adaptor import cpu, npu, seams
from mindspeed_models.adaptor.seams import DEVICES, KINDS, SEAMS, SHIM_CALLS, format_table, seams_for


def _source(seam) -> list[str]:
    spec = importlib.util.find_spec("megatron")
    assert spec is not None, "megatron-core is a dependency of mindspeed-models"
    root = Path(next(iter(spec.submodule_search_locations))) / "core"
    return (root / (seam.module.replace(".", "/") + ".py")).read_text().splitlines()


def test_rows_are_unique_and_well_formed():
    keys = [(s.key, s.kind) for s in SEAMS]
    assert len(keys) == len(set(keys))
    for seam in SEAMS:
        assert seam.kind in KINDS and set(seam.devices) <= set(DEVICES) and seam.devices, seam
        assert seam.calls and seam.lines and seam.cpu and seam.npu and seam.why, seam


CODE_ROWS = [s for s in SEAMS if s.kind not in ("attr", "log")]


@pytest.mark.parametrize("seam", CODE_ROWS, ids=lambda s: f"{s.module}:{s.target}:{s.kind}")
def test_listed_lines_are_cuda_call_sites_in_megatron_source(seam):
    lines = _source(seam)
    for number in seam.lines:
        assert "cuda" in lines[number - 1], f"{seam.module}:{number} is not a CUDA call site: {lines[number - 1]!r}"


@pytest.mark.parametrize("seam", [s for s in SEAMS if s.kind == "torch"], ids=lambda s: s.module)
def test_torch_rows_list_every_shim_call_their_module_makes(seam):
    used = set(re.findall(r"torch\.cuda\.(\w+)", "\n".join(_source(seam))))
    assert set(seam.calls) <= set(SHIM_CALLS)
    assert used & set(SHIM_CALLS) == set(seam.calls), "the table must name exactly the shimmed calls used there"


def test_every_device_shim_implements_every_listed_call():
    for name in SHIM_CALLS:
        assert name in vars(cpu.CpuCuda), f"CpuCuda.{name} must be explicit, not forwarded to torch.cuda"
    assert set(npu.NPU_CALLS) == set(SHIM_CALLS)


@pytest.mark.parametrize("device, module", [("cpu", cpu), ("npu", npu)])
def test_attr_and_log_rows_match_the_device_tables(device, module):
    assert {s.key for s in seams_for(device) if s.kind == "attr"} == set(module.REPLACEMENTS)
    assert {s.key for s in seams_for(device) if s.kind == "log"} == set(module.LOG_FILTERS)


def test_cuda_has_no_rows_and_bad_device_is_rejected():
    assert seams_for("cuda") == ()
    with pytest.raises(ValueError, match="device='tpu'"):
        seams_for("tpu")


def test_format_table_renders_one_line_per_row():
    table = format_table("cpu").splitlines()
    assert len(table) == 2 + len(seams_for("cpu"))
    assert "tensor_parallel.mappings" in table[2] and seams.SEAMS[0].cpu in table[2]
    assert len(format_table("npu").splitlines()) == 2 + len(seams_for("npu"))
