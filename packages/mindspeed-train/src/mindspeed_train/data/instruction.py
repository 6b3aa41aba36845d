"""Instruction (SFT) preprocessing: records -> ``{prefix}_packed_{key}_document`` datasets.

Three indexed datasets are written side by side, as MindSpeed-LLM names them:
``{prefix}_packed_input_ids_document``, ``{prefix}_packed_attention_mask_document`` and
``{prefix}_packed_labels_document``. Without ``--pack`` each sample is one sequence; with it
each pack is one sequence (see :mod:`mindspeed_train.data.packing` for the mask format).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mindspeed_train.data.encode import (
    IGNORE_INDEX,
    LossMask,
    segments_from_hf_template,
    segments_from_template,
    tokenize_segments,
)
from mindspeed_train.data.handlers import Conversation, get_handler
from mindspeed_train.data.packing import plan_packs, segment_ids
from mindspeed_train.data.pool import ordered_map
from mindspeed_train.data.progress import progress
from mindspeed_train.data.readers import expand_inputs, read_records
from mindspeed_train.data.templates import check_tokenizer_has, get_template
from mindspeed_train.data.tokenizer import TokenizerSpec, load_tokenizer
from mindspeed_train.data.writer import IndexedWriter, dataset_prefix

KEYS = ("input_ids", "attention_mask", "labels")


@dataclass(frozen=True)
class InstructionJob:
    """What ``mindspeed preprocess --handler-name ...`` does.

    Attributes:
        seq_length: longest sample in tokens (None: no limit; required with ``pack``).
        no_cut_token: drop samples longer than ``seq_length`` instead of cutting their tail.
        pack / neat_pack: pack samples up to ``seq_length``; neat also records sample
            boundaries in ``attention_mask`` (implies pack).
        prompt_type / hf_chat_template: exactly one chooses the prompt format.
    """

    inputs: tuple[str, ...]
    output_prefix: str
    tokenizer: TokenizerSpec
    handler_name: str = "AlpacaStyleInstructionHandler"
    prompt_type: str | None = None
    hf_chat_template: bool = False
    map_keys: dict[str, Any] = field(default_factory=dict)
    seq_length: int | None = None
    pack: bool = False
    neat_pack: bool = False
    no_cut_token: bool = False
    loss_mask: LossMask = LossMask()
    workers: int = 1
    log_interval: int = 100

    def __post_init__(self) -> None:
        get_handler(self.handler_name)
        if self.hf_chat_template == (self.prompt_type is not None):
            raise ValueError("pass exactly one of --prompt-type NAME and --hf-chat-template for instruction data")
        if self.prompt_type is not None:
            get_template(self.prompt_type)
        if (self.pack or self.neat_pack) and not self.seq_length:
            raise ValueError("--pack/--neat-pack need --seq-length (the packed sequence length)")
        if self.seq_length is not None and self.seq_length < 1:
            raise ValueError(f"seq_length={self.seq_length} must be >= 1")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1; pass --workers 1 or more")

    @property
    def packing(self) -> bool:
        return self.pack or self.neat_pack


@dataclass(frozen=True)
class _State:
    tokenizer: Any
    template: Any
    mask: LossMask


def _make_state(job: InstructionJob) -> _State:
    tok = load_tokenizer(job.tokenizer)
    template = None
    if job.prompt_type is not None:
        template = get_template(job.prompt_type)
        check_tokenizer_has(template, tok)
    return _State(tok, template, job.loss_mask)


def encode_conversation(state: _State, conv: Conversation) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation under the job's template and loss mask."""
    if state.template is not None:
        segments = segments_from_template(conv, state.template)
    else:
        segments = segments_from_hf_template(conv, state.tokenizer)
    return tokenize_segments(segments, state.tokenizer, state.mask)


def _conversations(job: InstructionJob, files: list[str]) -> Iterator[Conversation]:
    handler = get_handler(job.handler_name)
    for record in read_records(files):
        yield handler(record, job.map_keys)


def _fit(ids: list[int], labels: list[int], job: InstructionJob, counts: dict[str, int]):
    """Apply seq_length: cut (default) or drop (no_cut_token); drop samples with no target left."""
    if job.seq_length is not None and len(ids) > job.seq_length:
        if job.no_cut_token:
            counts["dropped_too_long"] += 1
            return None
        ids, labels = ids[: job.seq_length], labels[: job.seq_length]
        counts["truncated"] += 1
    if all(x == IGNORE_INDEX for x in labels):
        counts["dropped_no_target"] += 1
        return None
    return ids, labels


def run_instruction(job: InstructionJob) -> dict[str, int]:
    """Run ``job``; returns counts (samples, sequences written, truncated, dropped_*)."""
    files = expand_inputs(job.inputs)
    _make_state(job)  # fail fast here on a bad tokenizer or a template it cannot encode
    counts = {"samples": 0, "sequences": 0, "truncated": 0, "dropped_too_long": 0, "dropped_no_target": 0}
    prefixes = {key: dataset_prefix(job.output_prefix, f"packed_{key}") for key in KEYS}
    results = ordered_map(encode_conversation, _conversations(job, files), job.workers, _make_state, (job,))
    kept: list[tuple[list[int], list[int]]] = []
    with IndexedWriter(prefixes) as writer, progress("preprocess", job.log_interval, unit="sample") as bar:
        for ids, labels in results:
            counts["samples"] += 1
            bar.update(1)
            sample = _fit(ids, labels, job, counts)
            if sample is None:
                continue
            if job.packing:
                kept.append(sample)  # packing plans over every sample, so it waits for all of them
            else:
                _write(writer, [sample], neat=False)
                counts["sequences"] += 1
        if job.packing:
            for pack in plan_packs([len(ids) for ids, _ in kept], job.seq_length):
                _write(writer, [kept[i] for i in pack], neat=job.neat_pack)
                counts["sequences"] += 1
    return counts


def _write(writer: IndexedWriter, samples: list[tuple[list[int], list[int]]], neat: bool) -> None:
    lengths = [len(ids) for ids, _ in samples]
    writer.add("input_ids", np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _ in samples]))
    writer.add("labels", np.concatenate([np.asarray(lab, dtype=np.int32) for _, lab in samples]))
    mask = segment_ids(lengths) if neat else np.ones(sum(lengths), dtype=np.int32)
    writer.add("attention_mask", mask)
