"""A tiny byte-level BPE tokenizer built on the spot (no downloads), saved as a HF tokenizer dir."""

from __future__ import annotations

import pytest

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "What is two plus two? Two plus two is four.",
    "You are a helpful assistant. Answer the question briefly.",
    "def add(a, b): return a + b  # numbers and code too 0123456789",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
            "<｜Assistant｜>"]

# Our own ChatML jinja template (same rendering rules as Qwen2-style templates: an optional
# system turn, every message framed by <|im_start|>role\n ... <|im_end|>\n).
CHATML_JINJA = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(path, chat_template: str | None = CHATML_JINJA) -> str:
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))
