"""The installed distribution is this tree's package, and it needs nothing beyond torch."""

import importlib.metadata as md
import subprocess
import sys

import mindspeed_kernels


def test_installed_distribution_is_this_package():
    assert md.version("mindspeed-kernels") == mindspeed_kernels.__version__


def test_declares_torch_only():
    requires = [r for r in md.requires("mindspeed-kernels") or [] if "extra ==" not in r]
    assert [r.split(">")[0].split("=")[0].strip() for r in requires] == ["torch"]


def test_imports_without_megatron_transformers_or_torch_npu():
    code = (
        "import sys, mindspeed_kernels, mindspeed_kernels.ops, mindspeed_kernels.rope, mindspeed_kernels.modules\n"
        "from mindspeed_kernels import registry; registry.availability()\n"
        "bad = [m for m in ('megatron', 'transformers', 'torch_npu', 'triton') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
