"""``mindspeed preprocess``: flags, exit codes, one-line errors, the entry point."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mindspeed_train.data.cli import main

pytest.importorskip("transformers")
indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_pretrain_flags(tmp_path, tokenizer_dir, capsys):
    src = _jsonl(tmp_path / "d.jsonl", [{"body": "Hello world."}, {"body": "The quick brown fox."}])
    rc = main(["--input", src, "--output-prefix", str(tmp_path / "pt"), "--tokenizer-name-or-path", tokenizer_dir,
               "--json-keys", "body", "--append-eod", "--workers", "2", "--log-interval", "1"])
    out, err = capsys.readouterr()
    assert rc == 0 and "documents=2" in out
    assert "preprocess: 1 docs" in err and "preprocess: 2 docs" in err  # one log line per --log-interval docs
    ds = indexed.IndexedDataset(str(tmp_path / "pt_body_document"))
    assert len(ds) == 2 and int(ds[1][-1]) == 0  # EOD = <|endoftext|>, id 0 in the tiny vocab


def test_instruction_flags(tmp_path, tokenizer_dir):
    src = _jsonl(tmp_path / "a.jsonl", [{"question": "Two plus two?", "answer": "Four."}] * 3)
    rc = main(["--input", src, "--output-prefix", str(tmp_path / "sft"), "--tokenizer-name-or-path", tokenizer_dir,
               "--handler-name", "AlpacaStyleInstructionHandler", "--prompt-type", "qwen", "--seq-length", "512",
               "--neat-pack", "--map-keys", '{"prompt": "question", "response": "answer"}'])
    assert rc == 0
    mask = indexed.IndexedDataset(str(tmp_path / "sft_packed_attention_mask_document"))
    assert len(mask) == 1 and mask[0].max() == 3  # three samples in one neat pack


@pytest.mark.parametrize(
    "extra,match",
    [(["--input", "MISSING.jsonl"], "--input MISSING.jsonl: no such file"),
     (["--prompt-type", "qwen"], "--prompt-type needs --handler-name"),
     (["--handler-name", "AlpacaStyleInstructionHandler"], "exactly one of --prompt-type"),
     (["--handler-name", "AlpacaStyleInstructionHandler", "--hf-chat-template", "--map-keys", "{bad"], "--map-keys is not valid"),
     (["--workers", "0"], "workers=0 must be >= 1"),
     (["--bogus"], "unrecognized arguments: --bogus")],
)
def test_bad_usage_exits_2_with_one_line(tmp_path, tokenizer_dir, capsys, extra, match):
    src = _jsonl(tmp_path / "d.jsonl", [{"text": "hi"}])
    argv = ["--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer-name-or-path", tokenizer_dir, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith("o_")]


def test_bad_json_line_exit_2(tmp_path, tokenizer_dir, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n{oops}\n', encoding="utf-8")
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer-name-or-path", tokenizer_dir]) == 2
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter imports megatron-core and transformers: ~9 s on 2 cores
def test_entry_point_and_module_run(tmp_path, tokenizer_dir):
    eps = {ep.name: ep.value for ep in md.entry_points(group="mindspeed.commands")}
    assert eps.get("preprocess") == "mindspeed_train.data.cli:main"
    src = _jsonl(tmp_path / "d.jsonl", [{"text": "Hello world."}])
    proc = subprocess.run([sys.executable, "-m", "mindspeed_train.data.cli", "--input", src, "--output-prefix",
                           str(tmp_path / "m"), "--tokenizer-name-or-path", tokenizer_dir],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ds = indexed.IndexedDataset(str(tmp_path / "m_text_document"))
    np.testing.assert_array_equal(ds.sequence_lengths, [len(ds[0])])


def test_marked_parameters_exist_and_have_cli_flags():
    from mindspeed_args.implemented import IMPLEMENTED_BY
    from mindspeed_args.schema import load_schema
    from mindspeed_train.config import TRAIN_PARAMETERS
    from mindspeed_train.data.cli import build_parser

    marked = IMPLEMENTED_BY["mindspeed-train"]
    assert marked <= set(load_schema().params)  # only names the schema knows
    flags = {a.dest for a in build_parser()._actions}
    # every one is a real `mindspeed preprocess` flag or a parameter `mindspeed train` reads
    assert marked == (marked & flags) | TRAIN_PARAMETERS
