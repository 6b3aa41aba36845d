"""Repository checks: layering catches forbidden imports; versions and changelogs agree."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from check_layering import check_package  # noqa: E402
from check_versions import problems  # noqa: E402

from repo import load_packages, sibling_closure  # noqa: E402


def _fake(tmp_path, dist: str, code: str):
    packages = load_packages()
    src = tmp_path / "src" / packages[dist].module
    src.mkdir(parents=True)
    (src / "bad.py").write_text(code)
    return replace(packages[dist], path=tmp_path), packages


def test_the_tree_passes_both_checks():
    assert problems() == []
    packages = load_packages()
    assert [p for pkg in packages.values() for p in check_package(pkg, packages)] == []


def test_upward_import_is_caught(tmp_path):
    pkg, packages = _fake(tmp_path, "mindspeed-kernels", "import mindspeed_train\n")
    found = check_package(pkg, packages)
    assert len(found) == 1 and "imports upward" in found[0]


def test_undeclared_sibling_and_third_party_are_caught(tmp_path):
    pkg, packages = _fake(tmp_path, "mindspeed-args", "import torch\nfrom mindspeed_ckpt import x\n")
    found = "\n".join(check_package(pkg, packages))
    assert "third-party 'torch'" in found and "mindspeed_ckpt" in found


def test_optional_arrow_only_lazily(tmp_path):
    pkg, packages = _fake(tmp_path, "mindspeed-models", "def f():\n    import mindspeed_ckpt\n")
    assert check_package(pkg, packages) == []


def test_sibling_closure_lists_dependencies_first():
    order = sibling_closure("mindspeed-rl")
    assert order[-1] == "mindspeed-rl" and order.index("mindspeed-kernels") < order.index("mindspeed-parallel")
