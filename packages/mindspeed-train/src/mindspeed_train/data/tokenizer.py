"""Load a Hugging Face tokenizer from a local directory, the way preprocessing and training need it.

``transformers`` is imported lazily so that ``import mindspeed_train.data`` stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PADDING_SIDES = ("right", "left")


@dataclass(frozen=True)
class TokenizerSpec:
    """How to load a tokenizer.

    Attributes:
        name_or_path: a LOCAL directory holding ``tokenizer.json`` / ``tokenizer_config.json``.
        padding_side: ``"right"`` (default, training) or ``"left"`` (generation).
        extra_special_tokens: token strings added as special tokens (never split).
        use_fast: False loads the slow (Python) tokenizer (``--tokenizer-not-use-fast``).
    """

    name_or_path: str
    padding_side: str = "right"
    extra_special_tokens: tuple[str, ...] = field(default_factory=tuple)
    use_fast: bool = True

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ValueError("tokenizer_name_or_path is empty; pass --tokenizer-name-or-path DIR (a local tokenizer directory)")
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"tokenizer_padding_side={self.padding_side!r} is not one of {PADDING_SIDES}; pass right or left")
        if isinstance(self.extra_special_tokens, str) or not isinstance(self.extra_special_tokens, Sequence):
            raise TypeError("extra_special_tokens must be a tuple of token strings, e.g. ('<tool>',)")


def load_tokenizer(spec: TokenizerSpec) -> Any:
    """Load the tokenizer ``spec`` describes, offline (``local_files_only=True``).

    Returns a ``transformers`` tokenizer with ``padding_side`` set, the extra special tokens
    added, and a pad token (the EOS token when the tokenizer defines none).
    Raises ValueError with a one-line reason when the directory is missing or unusable.
    """
    path = os.fspath(spec.name_or_path)
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer_name_or_path {path!r} is not a local directory; "
                         "pass the directory the tokenizer was saved to")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("loading a tokenizer needs transformers: pip install 'transformers>=4.45'") from exc
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=spec.use_fast, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ValueError(f"cannot load a tokenizer from {path!r} ({reason}); "
                         "it needs tokenizer.json or tokenizer_config.json") from exc
    tok.padding_side = spec.padding_side
    if spec.extra_special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(spec.extra_special_tokens)})
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer at {path!r} has no eos_token; "
                         "set eos_token in its tokenizer_config.json (it is the EOD id)")
    if tok.pad_token_id is None:
        # Padding positions are masked out of the loss, so reusing EOS is safe and keeps the vocab unchanged.
        tok.pad_token = tok.eos_token
    return tok


def eod_id(tokenizer: Any) -> int:
    """The end-of-document id appended by ``--append-eod``: the tokenizer's EOS id."""
    return int(tokenizer.eos_token_id)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without BOS/EOS added by the tokenizer (templates add their own)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
