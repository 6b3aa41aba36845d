"""Tokenizer loading from a local directory: options, EOD id, one-line errors."""

from __future__ import annotations

import pytest

from mindspeed_train.data.tokenizer import TokenizerSpec, encode, eod_id, load_tokenizer

pytest.importorskip("transformers")


def test_loads_local_dir_with_options(tokenizer_dir):
    tok = load_tokenizer(TokenizerSpec(tokenizer_dir, padding_side="left", extra_special_tokens=("<tool>",)))
    assert tok.padding_side == "left"
    assert eod_id(tok) == tok.convert_tokens_to_ids("<|endoftext|>")
    ids = encode(tok, "call <tool> now")
    assert tok.convert_tokens_to_ids("<tool>") in ids  # added as one special token, never split
    assert tok.decode(encode(tok, "Hello world")) == "Hello world"


def test_bad_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        load_tokenizer(TokenizerSpec(str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="tokenizer_padding_side"):
        TokenizerSpec(str(tmp_path), padding_side="middle")
    with pytest.raises(ValueError, match="cannot load a tokenizer") as info:
        load_tokenizer(TokenizerSpec(str(tmp_path)))  # an empty directory
    assert "\n" not in str(info.value)
