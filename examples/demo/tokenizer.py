"""Train a small byte-level BPE tokenizer on a jsonl corpus and save it as a Hugging Face
tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json`` with a ChatML chat template).

Special tokens: ``<|endoftext|>`` (padding), ``<|im_start|>`` and ``<|im_end|>`` (ChatML turns;
``<|im_end|>`` is also the EOS / end-of-document id, as in Qwen's chat models).

    python tokenizer.py CORPUS.jsonl OUT_DIR [--vocab-size 2048]
"""

from __future__ import annotations

import argparse
import json
import sys

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML, the same text as mindspeed preprocess's --prompt-type chatml (no default system prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def texts(path: str):
    """The ``text`` field of every jsonl record."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)["text"]


def train(corpus: str, out_dir: str, vocab_size: int) -> int:
    """Train, save to ``out_dir``; returns the vocabulary size (special tokens included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   additional_special_tokens=[IM_START], chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(out_dir)
    return len(fast)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus")
    parser.add_argument("out_dir")
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    size = train(args.corpus, args.out_dir, args.vocab_size)
    print(f"tokenizer: {size} tokens (eos {IM_END}, pad {PAD}) -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
