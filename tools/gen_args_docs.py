"""Write docs/args.md from the mindspeed-args schema, or check that it is up to date.

Usage: python tools/gen_args_docs.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

from mindspeed_args.docs import render

TARGET = Path(__file__).resolve().parents[1] / "docs" / "args.md"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET} is stale: run python tools/gen_args_docs.py")
            return 1
        print(f"{TARGET.name} is up to date")
        return 0
    tmp = TARGET.with_suffix(".md.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(TARGET)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
