"""Fail unless each named sibling is installed from this tree (not from a package index).

PyPI holds unrelated placeholders named mindspeed, mindspeed-llm and mindspeed-rl: a sibling
resolved from an index would have no direct_url.json pointing into packages/.

Usage: python tools/check_install.py mindspeed-args [mindspeed-cli ...]
"""

from __future__ import annotations

import importlib.metadata as md
import json
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

from repo import PACKAGES_DIR, load_packages


def origin(dist: str) -> Path | None:
    text = md.distribution(dist).read_text("direct_url.json")
    if not text:
        return None
    url = urlparse(json.loads(text).get("url", ""))
    return Path(unquote(url.path)).resolve() if url.scheme == "file" else None


def main(names: list[str]) -> int:
    tree = load_packages()
    bad = []
    for name in names:
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            bad.append(f"{name}: not installed")
            continue
        where = origin(name)
        if where != (PACKAGES_DIR / name).resolve():
            bad.append(f"{name} {version}: installed from {where or 'a package index'}, not {PACKAGES_DIR / name}")
        elif version != tree[name].version:
            bad.append(f"{name}: installed {version}, tree has {tree[name].version}")
    for line in bad:
        print(line)
    print(f"install origin: {len(names)} siblings checked, {len(bad)} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
