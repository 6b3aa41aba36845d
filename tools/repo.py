"""Facts about the monorepo's packages, read from their pyproject.toml files (stdlib only)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES_DIR = ROOT / "packages"
_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$")


@dataclass(frozen=True)
class Package:
    """One package under packages/: distribution name, import name, version and requirements."""

    dist: str
    path: Path
    module: str
    version: str
    requires: tuple[str, ...]          # every requirement string of [project].dependencies
    optional: dict[str, tuple[str, ...]]

    @property
    def sibling_requires(self) -> dict[str, str]:
        """Sibling distribution name -> its version specifier (e.g. '>=0.1,<0.2')."""
        return {n: spec for n, spec in map(split_requirement, self.requires) if n in PACKAGE_NAMES}

    @property
    def third_party_requires(self) -> tuple[str, ...]:
        return tuple(n for n, _ in map(split_requirement, self.requires) if n not in PACKAGE_NAMES)


def split_requirement(req: str) -> tuple[str, str]:
    """'mindspeed-args>=0.1,<0.2' -> ('mindspeed-args', '>=0.1,<0.2'); names normalised to lower-case."""
    m = _REQ_NAME.match(req.split(";")[0])
    if not m:
        raise ValueError(f"cannot parse requirement {req!r}")
    return m.group(1).lower().replace("_", "-"), m.group(2).strip()


def read_version(pkg_dir: Path, module: str) -> str:
    text = (pkg_dir / "src" / module / "_version.py").read_text()
    m = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    if not m:
        raise ValueError(f"{pkg_dir}: no __version__ in _version.py")
    return m.group(1)


def load_packages() -> dict[str, Package]:
    out = {}
    for pyproject in sorted(PACKAGES_DIR.glob("*/pyproject.toml")):
        data = tomllib.loads(pyproject.read_text())
        project = data["project"]
        module = project["name"].replace("-", "_")
        out[project["name"]] = Package(
            dist=project["name"],
            path=pyproject.parent,
            module=module,
            version=read_version(pyproject.parent, module),
            requires=tuple(project.get("dependencies", ())),
            optional={k: tuple(v) for k, v in project.get("optional-dependencies", {}).items()},
        )
    return out


PACKAGE_NAMES = frozenset(p.parent.name for p in PACKAGES_DIR.glob("*/pyproject.toml"))


def sibling_closure(dist: str, packages: dict[str, Package] | None = None) -> list[str]:
    """dist and every sibling it needs, transitively, dependencies first."""
    packages = packages or load_packages()
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for dep in packages[name].sibling_requires:
            visit(dep)
        order.append(name)

    visit(dist)
    return order
