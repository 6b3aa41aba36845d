"""Pretraining preprocessing: raw documents -> ``{prefix}_{key}_document`` indexed datasets.

Each document becomes one sequence (its tokens, plus the EOS id when ``append_eod``), so the
index's document boundaries are the raw documents' boundaries. Empty documents are skipped,
as megatron's own preprocessing does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from mindspeed_train.data.pool import ordered_map
from mindspeed_train.data.progress import progress
from mindspeed_train.data.readers import expand_inputs, field_text, read_records
from mindspeed_train.data.tokenizer import TokenizerSpec, eod_id, load_tokenizer
from mindspeed_train.data.writer import IndexedWriter, dataset_prefix


@dataclass(frozen=True)
class PretrainJob:
    """What ``mindspeed preprocess`` does without ``--handler-name``.

    Attributes:
        inputs: files or directories (jsonl/json/parquet/plain text).
        output_prefix: outputs are ``{output_prefix}_{key}_document.bin/.idx``.
        tokenizer: how to load the tokenizer.
        json_keys: record keys to tokenize, one dataset each.
        append_eod: append the EOS id after every document.
        workers: tokenizer processes (output is identical for any count).
        log_interval: documents between progress-bar refreshes.
    """

    inputs: tuple[str, ...]
    output_prefix: str
    tokenizer: TokenizerSpec
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False
    workers: int = 1
    log_interval: int = 100

    def __post_init__(self) -> None:
        if not self.json_keys:
            raise ValueError("json_keys is empty; pass --json-keys text (or your column names)")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1; pass --workers 1 or more")
        if self.log_interval < 1:
            raise ValueError(f"log_interval={self.log_interval} must be >= 1")


@dataclass(frozen=True)
class _State:
    tokenizer: object
    eod: int | None


def _make_state(spec: TokenizerSpec, append_eod: bool) -> _State:
    tok = load_tokenizer(spec)
    return _State(tok, eod_id(tok) if append_eod else None)


def tokenize_document(state: _State, texts: tuple[str, ...]) -> tuple[list[int], ...]:
    """Token ids of each text (the tokenizer's default special tokens, then EOD when asked)."""
    out = []
    for text in texts:
        ids = list(state.tokenizer(text)["input_ids"]) if text else []
        if ids and state.eod is not None:
            ids.append(state.eod)
        out.append(ids)
    return tuple(out)


def _texts(files: list[str], keys: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    for record in read_records(files):
        yield tuple(field_text(record, key) for key in keys)


def run_pretrain(job: PretrainJob) -> dict[str, int]:
    """Run ``job``; returns counts ``{"documents": n, "skipped_empty": m, "tokens": t}``."""
    files = expand_inputs(job.inputs)
    load_tokenizer(job.tokenizer)  # fail fast, in this process, on a bad tokenizer path
    prefixes = {key: dataset_prefix(job.output_prefix, key) for key in job.json_keys}
    counts = {"documents": 0, "skipped_empty": 0, "tokens": 0}
    results = ordered_map(tokenize_document, _texts(files, job.json_keys), job.workers, _make_state,
                          (job.tokenizer, job.append_eod))
    with IndexedWriter(prefixes) as writer, progress("preprocess", job.log_interval) as bar:
        for ids_per_key in results:
            for key, ids in zip(job.json_keys, ids_per_key, strict=True):
                if ids:
                    writer.add(key, ids)
                    counts["tokens"] += len(ids)
                else:
                    counts["skipped_empty"] += 1
            counts["documents"] += 1
            bar.update(1)
    return counts
