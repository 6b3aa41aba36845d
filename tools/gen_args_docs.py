"""Write docs/args.md from the mindspeed-args schema, or check that it is up to date.

Usage: python tools/gen_args_docs.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

from docgen import write_or_check

from mindspeed_args.docs import render

TARGET = Path(__file__).resolve().parents[1] / "docs" / "args.md"


def main(argv: list[str]) -> int:
    return write_or_check(TARGET, render(), argv, "python tools/gen_args_docs.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
