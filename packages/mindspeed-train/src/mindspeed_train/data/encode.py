"""Conversation -> (input_ids, labels) with loss masks.

The rendered text is cut into segments (prompt parts and response parts) and each segment is
tokenized on its own, so a label mask never depends on where BPE merges fall; a test checks
that the concatenation equals tokenizing the whole rendered text. ``labels`` are aligned with
``input_ids`` (not shifted) and hold ``IGNORE_INDEX`` where no loss is taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mindspeed_train.data.handlers import Conversation
from mindspeed_train.data.templates import Template
from mindspeed_train.data.tokenizer import encode

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossMask:
    """Which tokens carry loss: by default only assistant replies.

    ``train_on_prompt`` trains on every token; ``mask_history`` trains only on the last reply.
    """

    train_on_prompt: bool = False
    mask_history: bool = False

    def __post_init__(self) -> None:
        if self.train_on_prompt and self.mask_history:
            raise ValueError("train_on_prompt and mask_history cannot both be set; pass at most one of them")


def segments_from_template(conv: Conversation, template: Template) -> list[tuple[str, int]]:
    """``[(text, turn)]``: turn -1 for prompt text, k for the k-th assistant reply."""
    out = [(template.render_system(conv.system), -1)]
    for k, (user, assistant) in enumerate(conv.turns):
        out.append((template.user.format(content=user), -1))
        out.append((template.assistant.format(content=assistant), k))
    return [(text, turn) for text, turn in out if text]


def segments_from_hf_template(conv: Conversation, tokenizer: Any) -> list[tuple[str, int]]:
    """Segments cut from the tokenizer's own chat template (``--hf-chat-template``).

    Rendering the conversation up to each reply with and without it must give texts that
    extend one another; a template that rewrites earlier turns is rejected.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--hf-chat-template: the tokenizer has no chat_template; pass --prompt-type instead")
    messages = [{"role": "system", "content": conv.system}] if conv.system else []
    out, done = [], ""
    for k, (user, assistant) in enumerate(conv.turns):
        messages.append({"role": "user", "content": user})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": assistant})
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("--hf-chat-template: the chat template re-renders earlier turns, so loss masks cannot be cut; "
                             "use --prompt-type")
        out += [(prompt[len(done):], -1), (full[len(prompt):], k)]
        done = full
    return [(text, turn) for text, turn in out if text]


def tokenize_segments(segments: list[tuple[str, int]], tokenizer: Any, mask: LossMask) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for ``segments`` under ``mask``."""
    last = max(turn for _, turn in segments)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, turn in segments:
        ids = encode(tokenizer, text)
        trained = mask.train_on_prompt or (turn >= 0 and (not mask.mask_history or turn == last))
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels
