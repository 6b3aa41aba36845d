"""Shared command-line tokenising for the flag dialects (megatron and swift)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from mindspeed_args.errors import UsageError


@dataclass(frozen=True)
class FlagUse:
    """One flag occurrence: '--seq-length 4096' -> FlagUse('--seq-length', ['4096'])."""

    flag: str
    tokens: list[str]
    inline: bool  # written as --flag=value


def _is_flag(tok: str) -> bool:
    return tok.startswith("--") and len(tok) > 2


def split_flags(argv: list[str]) -> tuple[list[FlagUse], list[str]]:
    """Group tokens under the flag before them. Returns (uses, problems for stray tokens)."""
    uses: list[FlagUse] = []
    problems: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not _is_flag(tok):
            problems.append(f"unexpected argument {tok!r} (parameters start with --)")
            i += 1
            continue
        flag, eq, inline = tok.partition("=")
        j = i + 1
        while j < len(argv) and not _is_flag(argv[j]):
            j += 1
        uses.append(FlagUse(flag, [inline] + argv[i + 1:j] if eq else argv[i + 1:j], bool(eq)))
        i = j
    return uses, problems


def split_shell(text: str) -> list[str]:
    """shlex words of shell text; backslash-newline continuations join lines as the shell does."""
    return shlex.split(text.replace("\\\n", " "), comments=True)


def read_flags_file(path: str) -> list[str]:
    """Tokens of a launch file: shell syntax, comments and backslash line continuations allowed.
    Only the training script's flags are kept: the launcher before it ('torchrun ... pretrain_gpt.py',
    'megatron sft') is dropped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        tokens = split_shell(text)
    except ValueError as exc:
        raise UsageError(f"{path}: cannot split into shell words ({exc})") from None
    start = _after_launcher(tokens)
    first = next((i for i in range(start, len(tokens)) if _is_flag(tokens[i])), len(tokens))
    return tokens[first:]


def _after_launcher(tokens: list[str]) -> int:
    """Index just past the training script ('pretrain_gpt.py', 'megatron sft'): the launcher's own
    options (torchrun --nproc_per_node ...) come before it. 0 when there is no script."""
    for i in range(len(tokens) - 1, -1, -1):
        if tokens[i].endswith(".py") or (i and tokens[i - 1] == "megatron" and tokens[i] in ("pt", "sft", "rlhf")):
            return i + 1
    return 0
