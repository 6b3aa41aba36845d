"""Prompt templates and loss masks, checked against jinja chat templates run by transformers."""

from __future__ import annotations

import pytest

from mindspeed_train.data.encode import (
    IGNORE_INDEX,
    LossMask,
    segments_from_hf_template,
    segments_from_template,
    tokenize_segments,
)
from mindspeed_train.data.handlers import Conversation
from mindspeed_train.data.templates import TEMPLATES, check_tokenizer_has, get_template
from mindspeed_train.data.tokenizer import TokenizerSpec, encode, load_tokenizer

pytest.importorskip("transformers")

# Reference renderings in jinja, in the shape the model families publish (system first, then
# user/assistant turns); transformers renders them, our tables must produce the same text.
LLAMA3_JINJA = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
DEEPSEEK3_JINJA = (
    "{{ '<｜begin▁of▁sentence｜>' }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% else %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)
CONV = Conversation("Answer briefly.", (("What is two plus two?", "Two plus two is four."), ("Hello world", "Hello!")))


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(TokenizerSpec(tokenizer_dir))


def _messages(conv):
    msgs = [{"role": "system", "content": conv.system}] if conv.system else []
    for user, assistant in conv.turns:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return msgs


@pytest.mark.parametrize("name,jinja", [("chatml", None), ("llama3", LLAMA3_JINJA), ("deepseek3", DEEPSEEK3_JINJA)])
def test_template_text_and_tokens_equal_apply_chat_template(tok, name, jinja):
    reference = tok.apply_chat_template(_messages(CONV), tokenize=False, chat_template=jinja)
    segments = segments_from_template(CONV, get_template(name))
    assert "".join(text for text, _ in segments) == reference
    ids, labels = tokenize_segments(segments, tok, LossMask())
    assert ids == encode(tok, reference)  # per-segment tokenization equals whole-text tokenization
    assert len(labels) == len(ids)


def test_qwen_adds_default_system_and_deepseek_alias(tok):
    text = "".join(t for t, _ in segments_from_template(Conversation(None, (("Hi", "Yo"),)), TEMPLATES["qwen"]))
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi")
    assert TEMPLATES["deepseek"] is TEMPLATES["deepseek3"]
    with pytest.raises(ValueError, match="prompt_type='nope' is unknown"):
        get_template("nope")


def _expected_labels(tok, conv, trained_turns, everything=False):
    labels = []
    for text, turn in segments_from_template(conv, TEMPLATES["chatml"]):
        ids = encode(tok, text)
        labels += ids if everything or turn in trained_turns else [IGNORE_INDEX] * len(ids)
    return labels


def test_labels_masked_exactly_on_prompt_and_history(tok):
    segments = segments_from_template(CONV, TEMPLATES["chatml"])
    ids, labels = tokenize_segments(segments, tok, LossMask())
    # the trained tokens decode to exactly the two replies with their end-of-turn markers
    trained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    assert trained == "Two plus two is four.<|im_end|>\nHello!<|im_end|>\n"
    assert labels == _expected_labels(tok, CONV, {0, 1})
    _, last_only = tokenize_segments(segments, tok, LossMask(mask_history=True))
    assert tok.decode([t for t in last_only if t != IGNORE_INDEX]) == "Hello!<|im_end|>\n"
    _, all_on = tokenize_segments(segments, tok, LossMask(train_on_prompt=True))
    assert all_on == ids
    with pytest.raises(ValueError, match="train_on_prompt and mask_history"):
        LossMask(train_on_prompt=True, mask_history=True)


def test_hf_chat_template_matches_chatml_table(tok):
    hf = tokenize_segments(segments_from_hf_template(CONV, tok), tok, LossMask())
    ours = tokenize_segments(segments_from_template(CONV, TEMPLATES["chatml"]), tok, LossMask())
    assert hf == ours


def test_hf_template_that_rewrites_history_is_rejected(tok):
    # renders only the last message: the prompt of turn 2 does not extend turn 1's text
    tok2 = type(tok).from_pretrained(tok.name_or_path)
    tok2.chat_template = "{{ messages[-1]['content'] }}"
    with pytest.raises(ValueError, match="re-renders earlier turns"):
        segments_from_hf_template(CONV, tok2)


def test_template_tokens_missing_from_vocab():
    class NoSpecials:
        def get_vocab(self):
            return {"a": 0}

    with pytest.raises(ValueError, match=r"prompt_type=llama3 needs special tokens \['<\|begin_of_text\|>'"):
        check_tokenizer_has(TEMPLATES["llama3"], NoSpecials())
