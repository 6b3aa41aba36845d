"""Enforce DESIGN.md's import arrows by parsing every package's source and tests.

A package may import only: the standard library, the third-party distributions it declares,
and the siblings DESIGN.md allows *and* it declares. An "optional" arrow (e.g. models -> ckpt's
name maps) is allowed only as a lazy import inside a function.

Usage: python tools/check_layering.py   (exit 0 ok, 1 with one line per offending import)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from repo import ROOT, load_packages, split_requirement

# DESIGN.md, "Allowed imports": package -> siblings it may import at module level.
ALLOWED = {
    "mindspeed-cli": set(),
    "mindspeed-rl": {"mindspeed-train", "mindspeed-models", "mindspeed-kernels", "mindspeed-parallel", "mindspeed-args"},
    "mindspeed-train": {"mindspeed-models", "mindspeed-parallel", "mindspeed-kernels", "mindspeed-args", "mindspeed-ckpt"},
    "mindspeed-models": {"mindspeed-parallel", "mindspeed-kernels"},
    "mindspeed-parallel": {"mindspeed-kernels"},
    "mindspeed-ckpt": set(),
    "mindspeed-kernels": set(),
    "mindspeed-args": set(),
}
# Arrows allowed only lazily (inside a function) and only as optional dependencies.
OPTIONAL = {
    "mindspeed-models": {"mindspeed-ckpt"},
    "mindspeed-ckpt": {"mindspeed-models"},
    "mindspeed-cli": {"mindspeed-kernels"},  # `mindspeed env` lists kernel backends when installed
}
# Import name -> distribution, for third-party modules whose names differ.
MODULE_TO_DIST = {"yaml": "pyyaml", "megatron": "megatron-core", "torch_npu": "torch-npu"}
# Test-only imports every package's tests may use.
TEST_ONLY = {"pytest", "mindspeed_cli"}


def imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, top-level module, is_lazy) for every absolute import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            out.append((node.lineno, name.split(".")[0], False))
    lazy_lines = {
        n.lineno
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    return [(ln, mod, ln in lazy_lines) for ln, mod, _ in out]


def check_package(pkg, packages) -> list[str]:
    module_to_sibling = {p.module: p.dist for p in packages.values()}
    declared = set(pkg.sibling_requires)
    optional_declared = {split_requirement(r)[0] for reqs in pkg.optional.values() for r in reqs}
    third_party = set(pkg.third_party_requires) | optional_declared
    out = []
    for path in sorted(pkg.path.rglob("*.py")):
        in_tests = "tests" in path.relative_to(pkg.path).parts
        for line, mod, lazy in imports(path):
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"
            if mod == pkg.module or mod in sys.stdlib_module_names or mod == "__future__":
                continue
            if mod in module_to_sibling:
                sib = module_to_sibling[mod]
                if in_tests and mod in TEST_ONLY:
                    continue
                if sib in ALLOWED[pkg.dist] and sib in declared:
                    continue
                if sib in OPTIONAL.get(pkg.dist, set()) and lazy:
                    continue
                why = "imports upward/sideways" if sib not in ALLOWED[pkg.dist] else "does not declare it"
                out.append(f"{where}: {pkg.dist} imports {mod} ({sib}) but {why}")
            elif not in_tests and MODULE_TO_DIST.get(mod, mod).replace("_", "-") not in third_party and not lazy:
                out.append(f"{where}: {pkg.dist} imports third-party {mod!r} it does not declare")
    return out


def main() -> int:
    packages = load_packages()
    problems = [p for pkg in packages.values() for p in check_package(pkg, packages)]
    for line in problems:
        print(line)
    print(f"layering: {len(packages)} packages, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
