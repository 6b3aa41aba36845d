"""Prompt templates (``--prompt-type``) as small data tables.

A conversation renders as::

    prefix + system.format(content=SYSTEM)              (system part omitted when SYSTEM is empty)
    + for each turn: user.format(content=Q)             (prompt: masked out of the loss)
                     assistant.format(content=A)        (response: trained on)

``user`` ends with the header that opens the assistant's reply, so the response segment is
exactly what the model must generate, including its end-of-turn token. The strings below were
written from each model family's published chat template rendering; the tests check ChatML
against a jinja template's ``apply_chat_template`` output.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    """One prompt format. ``special_tokens`` must exist in the tokenizer's vocabulary."""

    name: str
    prefix: str
    system: str
    user: str
    assistant: str
    default_system: str = ""
    special_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for part in ("system", "user", "assistant"):
            if "{content}" not in getattr(self, part):
                raise ValueError(f"template {self.name}: {part} format must contain '{{content}}'")

    def render_system(self, system: str | None) -> str:
        """Prefix plus the system part (the default system when ``system`` is None)."""
        text = self.default_system if system is None else system
        return self.prefix + (self.system.format(content=text) if text else "")


_CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>")
_LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_DS_BOS, _DS_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

TEMPLATES: dict[str, Template] = {
    "chatml": Template(
        name="chatml",
        prefix="",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{content}<|im_end|>\n",
        special_tokens=_CHATML_SPECIALS,
    ),
    # Qwen / Qwen2 chat format: ChatML with a default system prompt when none is given.
    "qwen": Template(
        name="qwen",
        prefix="",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{content}<|im_end|>\n",
        default_system="You are a helpful assistant.",
        special_tokens=_CHATML_SPECIALS,
    ),
    "llama3": Template(
        name="llama3",
        prefix="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{content}<|eot_id|>",
        special_tokens=_LLAMA3_SPECIALS,
    ),
    # DeepSeek-V2 chat format ("User: ...\n\nAssistant: ...").
    "deepseek2": Template(
        name="deepseek2",
        prefix=_DS_BOS,
        system="{content}\n\n",
        user="User: {content}\n\nAssistant:",
        assistant=" {content}" + _DS_EOS,
        special_tokens=(_DS_BOS, _DS_EOS),
    ),
    # DeepSeek-V3 / R1 chat format (role tokens, no newlines between turns).
    "deepseek3": Template(
        name="deepseek3",
        prefix=_DS_BOS,
        system="{content}",
        user="<｜User｜>{content}<｜Assistant｜>",
        assistant="{content}" + _DS_EOS,
        special_tokens=(_DS_BOS, _DS_EOS, "<｜User｜>", "<｜Assistant｜>"),
    ),
}
TEMPLATES["deepseek"] = TEMPLATES["deepseek3"]


def get_template(name: str) -> Template:
    """The template called ``name``; ValueError listing the known names otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted(TEMPLATES))
        raise ValueError(f"prompt_type={name!r} is unknown; choose one of {known}, or pass --hf-chat-template") from None


def check_tokenizer_has(template: Template, tokenizer) -> None:
    """ValueError when a special token of ``template`` would be split into pieces by ``tokenizer``."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in template.special_tokens if t not in vocab]
    if missing:
        raise ValueError(
            f"prompt_type={template.name} needs special tokens {missing} that the tokenizer lacks; "
            "pick the prompt type of this model family or pass --hf-chat-template"
        )
