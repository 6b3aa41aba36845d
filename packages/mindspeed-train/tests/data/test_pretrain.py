"""Pretraining preprocessing, read back with megatron-core's own IndexedDataset."""

from __future__ import annotations

import filecmp
import json
import os
import sys

import numpy as np
import pytest

from mindspeed_train.data.pretrain import PretrainJob, run_pretrain
from mindspeed_train.data.readers import DataError
from mindspeed_train.data.tokenizer import TokenizerSpec

pytest.importorskip("transformers")
indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

DOCS = ["The quick brown fox.", "Hello world, two plus two is four.", "", "A lazy dog jumps over the tiny corpus."]


def _write_jsonl(path, docs, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({key: text, "id": i}) + "\n")
    return str(path)


def _job(tmp_path, tokenizer_dir, inputs, name, **kw):
    return PretrainJob(inputs=tuple(inputs), output_prefix=str(tmp_path / name), tokenizer=TokenizerSpec(tokenizer_dir), **kw)


def test_readback_equals_direct_tokenization(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    src = _write_jsonl(tmp_path / "a.jsonl", DOCS)
    counts = run_pretrain(_job(tmp_path, tokenizer_dir, [src], "out", append_eod=True))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    expected = [tok(t)["input_ids"] + [tok.eos_token_id] for t in DOCS if t]
    ds = indexed.IndexedDataset(str(tmp_path / "out_text_document"))
    assert len(ds) == len(expected) == counts["documents"] - counts["skipped_empty"]
    for i, ids in enumerate(expected):
        np.testing.assert_array_equal(ds[i], np.asarray(ids))
    # one sequence per document: the index's document boundaries are the raw documents
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(expected) + 1))
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_two_workers_write_identical_files(tmp_path, tokenizer_dir):
    docs = [f"{DOCS[i % 4]} number {i}" for i in range(40)]
    src = _write_jsonl(tmp_path / "many.jsonl", docs)
    run_pretrain(_job(tmp_path, tokenizer_dir, [src], "w1", append_eod=True, workers=1))
    run_pretrain(_job(tmp_path, tokenizer_dir, [src], "w2", append_eod=True, workers=2))
    for suffix in (".bin", ".idx"):
        assert filecmp.cmp(tmp_path / f"w1_text_document{suffix}", tmp_path / f"w2_text_document{suffix}", shallow=False)


def test_several_keys_and_text_dirs(tmp_path, tokenizer_dir):
    src = tmp_path / "two.jsonl"
    src.write_text(json.dumps({"q": "Hello world", "a": "The fox."}) + "\n", encoding="utf-8")
    run_pretrain(_job(tmp_path, tokenizer_dir, [str(src)], "kv", json_keys=("q", "a")))
    assert len(indexed.IndexedDataset(str(tmp_path / "kv_q_document"))) == 1
    assert len(indexed.IndexedDataset(str(tmp_path / "kv_a_document"))) == 1
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "b.txt").write_text("Two plus two.", encoding="utf-8")
    (texts / "a.txt").write_text("Hello world.", encoding="utf-8")
    run_pretrain(_job(tmp_path, tokenizer_dir, [str(texts)], "txt"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ds = indexed.IndexedDataset(str(tmp_path / "txt_text_document"))
    assert len(ds) == 2
    np.testing.assert_array_equal(ds[0], tok("Hello world.")["input_ids"])  # sorted order: a.txt first


@pytest.mark.parametrize(
    "content,match",
    [('{"text": "ok"}\n{"text": broken\n', r"bad\.jsonl:2: invalid JSON"),
     ('{"body": "no text key"}\n', r"bad\.jsonl:1: no key 'text'"),
     ('"just a string"\n', r"bad\.jsonl:1: expected a JSON object")],
)
def test_bad_input_names_file_and_line(tmp_path, tokenizer_dir, content, match):
    src = tmp_path / "bad.jsonl"
    src.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        run_pretrain(_job(tmp_path, tokenizer_dir, [str(src)], "bad"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith("bad_")]  # nothing half-written left behind


def test_missing_input_and_parquet_without_pyarrow(tmp_path, tokenizer_dir, monkeypatch):
    with pytest.raises(DataError, match="no such file"):
        run_pretrain(_job(tmp_path, tokenizer_dir, [str(tmp_path / "nope.jsonl")], "x"))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"d\.parquet: reading parquet needs pyarrow: pip install 'mindspeed-train\[parquet\]'"):
        run_pretrain(_job(tmp_path, tokenizer_dir, [str(tmp_path / "d.parquet")], "pq"))


def test_parquet_input(tmp_path, tokenizer_dir):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from transformers import AutoTokenizer

    docs = [d for d in DOCS if d]
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), str(tmp_path / "d.parquet"), row_group_size=2)
    run_pretrain(_job(tmp_path, tokenizer_dir, [str(tmp_path / "d.parquet")], "pq"))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ds = indexed.IndexedDataset(str(tmp_path / "pq_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok(d)["input_ids"] for d in docs]
