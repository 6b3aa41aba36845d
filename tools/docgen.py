"""Shared tail of the doc generators: write a generated page atomically, or check it is fresh."""

from __future__ import annotations

from pathlib import Path


def write_or_check(target: Path, text: str, argv: list[str], command: str) -> int:
    """With ``--check`` in argv: 0 if ``target`` holds ``text``, else 1 naming ``command``.
    Otherwise write ``text`` to ``target`` through a temporary file and a rename."""
    if "--check" in argv:
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            print(f"{target} is stale: run {command}")
            return 1
        print(f"{target.name} is up to date")
        return 0
    tmp = target.with_suffix(".md.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    print(f"wrote {target}")
    return 0
