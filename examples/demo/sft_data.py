"""Write an alpaca-style instruction set (``{"instruction", "input", "output"}`` jsonl) from the
same standard-library docstrings as the corpus: "What does json.dumps do?" -> the docstring's
first sentence. Deterministic (the corpus's fixed module order).

    python sft_data.py OUT.jsonl
"""

from __future__ import annotations

import json
import re
import sys

from corpus import MODULES, docstrings

_SIGNATURE = re.compile(r"^[\w.]+\(.*\)( -> .*)?$")  # builtins' docstrings start with "name(args)"


def summary(doc: str) -> str | None:
    """The first sentence of the first paragraph that is not a signature line; None when there is none."""
    for para in doc.split("\n\n"):
        text = " ".join(line.strip() for line in para.splitlines() if not _SIGNATURE.match(line.strip()))
        if text:
            first = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
            return first if 8 <= len(first) <= 160 else None
    return None


def records() -> list[dict]:
    """One question per documented module member (modules themselves: "What is X for?")."""
    out = []
    for name, doc in docstrings():
        answer = summary(doc)
        if answer is None:
            continue
        question = f"What is the {name} module for?" if name in MODULES else f"What does {name} do?"
        out.append({"instruction": question, "input": "", "output": answer})
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: sft_data.py OUT.jsonl", file=sys.stderr)
        return 2
    rows = records()
    with open(argv[0], "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print(f"sft data: {len(rows)} instruction records -> {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
