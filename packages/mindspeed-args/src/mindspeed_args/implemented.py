"""Which package implements which parameters today (an explicit table, updated as features land).

A parameter missing here is accepted only at its default; set to anything else, validation
reports it as not implemented yet, naming the package that will own it.
"""

from __future__ import annotations

IMPLEMENTED_BY: dict[str, frozenset[str]] = {
    # Issue #6, data part: `mindspeed preprocess` (mindspeed_train.data) implements these. The
    # preprocessing-only flags (--input, --output-prefix, --json-keys, --handler-name, --map-keys,
    # --append-eod) are not schema parameters.
    "mindspeed-train": frozenset({
        "tokenizer_name_or_path",
        "tokenizer_padding_side",
        "tokenizer_not_use_fast",
        "prompt_type",
        "hf_chat_template",
        "no_cut_token",
        "pack",
        "neat_pack",
        "train_on_prompt",
        "mask_history",
        "workers",
    }),
}


def implementer(name: str) -> str | None:
    """The distribution that implements ``name``, or None."""
    return next((dist for dist, names in IMPLEMENTED_BY.items() if name in names), None)
