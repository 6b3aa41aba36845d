"""Check that every sibling version range is met by the tree and every CHANGELOG covers its version.

Usage: python tools/check_versions.py   (exit 0 ok, 1 with one line per problem)
"""

from __future__ import annotations

import re
import sys

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from repo import load_packages


def problems() -> list[str]:
    packages = load_packages()
    out = []
    for pkg in packages.values():
        for dep, spec in pkg.sibling_requires.items():
            if "==" in spec or not spec:
                out.append(f"{pkg.dist}: sibling {dep} must use a compatible range, not {spec or 'no range'!r}")
                continue
            try:
                ok = Version(packages[dep].version) in SpecifierSet(spec)
            except InvalidSpecifier:
                ok = False
            if not ok:
                out.append(f"{pkg.dist}: requires {dep}{spec} but the tree has {dep} {packages[dep].version}")
        changelog = (pkg.path / "CHANGELOG.md").read_text()
        if not re.search(rf"^##\s+\[?{re.escape(pkg.version)}\]?\b", changelog, re.M):
            out.append(f"{pkg.dist}: CHANGELOG.md has no '## {pkg.version}' entry")
    return out


def main() -> int:
    found = problems()
    for line in found:
        print(line)
    print(f"versions: {len(load_packages())} packages, {len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
