"""Instruction preprocessing end to end, read back with megatron-core's IndexedDataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mindspeed_train.data.encode import IGNORE_INDEX, LossMask, segments_from_template, tokenize_segments
from mindspeed_train.data.handlers import Conversation, alpaca, sharegpt
from mindspeed_train.data.instruction import InstructionJob, run_instruction
from mindspeed_train.data.packing import cu_seqlens_from_segments
from mindspeed_train.data.readers import DataError, Record
from mindspeed_train.data.templates import TEMPLATES
from mindspeed_train.data.tokenizer import TokenizerSpec, load_tokenizer

pytest.importorskip("transformers")
indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

ALPACA = [
    {"instruction": "What is two plus two?", "input": "", "output": "Four."},
    {"instruction": "Say hello", "input": "to the world", "output": "Hello world!", "system": "Be brief."},
    {"instruction": "And the fox?", "output": "The quick brown fox.", "history": [["Hi", "Hello!"]]},
    {"instruction": "Tell me a tiny story about a lazy dog please", "output": "The lazy dog jumps over the quick fox."},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _ds(prefix, key):
    return indexed.IndexedDataset(f"{prefix}_packed_{key}_document")


def _expected(tok, conv, template="chatml"):
    return tokenize_segments(segments_from_template(conv, TEMPLATES[template]), tok, LossMask())


def _job(tmp_path, tokenizer_dir, src, name, **kw):
    kw.setdefault("prompt_type", "chatml")
    return InstructionJob(inputs=(src,), output_prefix=str(tmp_path / name), tokenizer=TokenizerSpec(tokenizer_dir), **kw)


def test_alpaca_round_trip_unpacked(tmp_path, tokenizer_dir):
    tok = load_tokenizer(TokenizerSpec(tokenizer_dir))
    src = _jsonl(tmp_path / "a.jsonl", ALPACA)
    counts = run_instruction(_job(tmp_path, tokenizer_dir, src, "sft"))
    assert counts["sequences"] == len(ALPACA)
    ids_ds, lab_ds, mask_ds = (_ds(tmp_path / "sft", k) for k in ("input_ids", "labels", "attention_mask"))
    for i, row in enumerate(ALPACA):
        ids, labels = _expected(tok, alpaca(Record("x:1", row), {}))
        np.testing.assert_array_equal(ids_ds[i], ids)
        np.testing.assert_array_equal(lab_ds[i], labels)
        np.testing.assert_array_equal(mask_ds[i], np.ones(len(ids)))
    # history turn is trained on too by default; the prompt (with "Hi") never is
    trained = tok.decode([t for t, lab in zip(ids_ds[2], lab_ds[2], strict=True) if lab != IGNORE_INDEX])
    assert trained == "Hello!<|im_end|>\nThe quick brown fox.<|im_end|>\n"


def test_neat_pack_boundaries_and_no_cross_attention(tmp_path, tokenizer_dir):
    tok = load_tokenizer(TokenizerSpec(tokenizer_dir))
    src = _jsonl(tmp_path / "a.jsonl", ALPACA * 3)
    singles = [_expected(tok, alpaca(Record("x:1", r), {})) for r in ALPACA * 3]
    seq_length = max(len(ids) for ids, _ in singles) + 10
    counts = run_instruction(_job(tmp_path, tokenizer_dir, src, "neat", seq_length=seq_length, neat_pack=True))
    ids_ds, lab_ds, mask_ds = (_ds(tmp_path / "neat", k) for k in ("input_ids", "labels", "attention_mask"))
    assert len(ids_ds) == counts["sequences"] < len(singles)
    seen = []
    for p in range(len(ids_ds)):
        assert len(ids_ds[p]) <= seq_length
        cu = cu_seqlens_from_segments(mask_ds[p])
        for start, end in zip(cu[:-1], cu[1:], strict=True):
            seen.append((ids_ds[p][start:end].tolist(), lab_ds[p][start:end].tolist()))
    # every sample comes back whole, exactly once, with its own labels
    assert sorted(map(repr, seen)) == sorted(repr((list(i), list(lab))) for i, lab in singles)


def test_plain_pack_mask_is_ones_and_truncation(tmp_path, tokenizer_dir):
    src = _jsonl(tmp_path / "a.jsonl", ALPACA)
    run_instruction(_job(tmp_path, tokenizer_dir, src, "pk", seq_length=64, pack=True))
    masks = _ds(tmp_path / "pk", "attention_mask")  # keep the dataset alive: its arrays view its mmap
    assert all(set(masks[p].tolist()) == {1} for p in range(len(masks)))
    long_len = len(_expected(load_tokenizer(TokenizerSpec(tokenizer_dir)), alpaca(Record("x:1", ALPACA[3]), {}))[0])
    cut = run_instruction(_job(tmp_path, tokenizer_dir, src, "cut", seq_length=long_len - 3))
    cut_ids = _ds(tmp_path / "cut", "input_ids")
    assert cut["truncated"] >= 1 and max(len(cut_ids[i]) for i in range(len(cut_ids))) == long_len - 3
    keep = run_instruction(_job(tmp_path, tokenizer_dir, src, "nocut", seq_length=long_len - 3, no_cut_token=True))
    assert keep["dropped_too_long"] >= 1 and keep["truncated"] == 0


def test_sharegpt_openai_and_hf_template_equal_chatml(tmp_path, tokenizer_dir):
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Two plus two?"},
                               {"from": "gpt", "value": "Four."}]},
            {"messages": [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hi!"}]}]
    src = _jsonl(tmp_path / "s.jsonl", rows)
    handler = "SharegptStyleInstructionHandler"
    run_instruction(_job(tmp_path, tokenizer_dir, src, "tbl", handler_name=handler, loss_mask=LossMask(mask_history=True)))
    run_instruction(_job(tmp_path, tokenizer_dir, src, "hf", handler_name=handler, prompt_type=None, hf_chat_template=True,
                         loss_mask=LossMask(mask_history=True), workers=2))
    for key in ("input_ids", "labels"):
        a, b = _ds(tmp_path / "tbl", key), _ds(tmp_path / "hf", key)
        assert len(a) == len(b) == 2
        for i in range(2):
            np.testing.assert_array_equal(a[i], b[i])
    tok = load_tokenizer(TokenizerSpec(tokenizer_dir))
    labels = _ds(tmp_path / "tbl", "labels")
    first = [t for t in labels[0].tolist() if t != IGNORE_INDEX]
    assert tok.decode(first) == "Four.<|im_end|>\n"  # mask_history: only the last reply


def test_handler_errors_name_the_record():
    with pytest.raises(DataError, match=r"f\.jsonl:3: no key 'output'"):
        alpaca(Record("f.jsonl:3", {"instruction": "x"}), {})
    with pytest.raises(DataError, match="must alternate"):
        sharegpt(Record("f:1", {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}), {})
    conv = alpaca(Record("f:1", {"q": "Q", "a": "A"}), {"prompt": "q", "response": "a"})
    assert conv == Conversation(None, (("Q", "A"),))


def test_job_validation():
    spec = TokenizerSpec("/nonexistent")
    with pytest.raises(ValueError, match="exactly one of --prompt-type"):
        InstructionJob(inputs=("x",), output_prefix="o", tokenizer=spec)
    with pytest.raises(ValueError, match="need --seq-length"):
        InstructionJob(inputs=("x",), output_prefix="o", tokenizer=spec, prompt_type="qwen", pack=True)
    with pytest.raises(ValueError, match="--handler-name 'Foo' is unknown"):
        InstructionJob(inputs=("x",), output_prefix="o", tokenizer=spec, prompt_type="qwen", handler_name="Foo")
