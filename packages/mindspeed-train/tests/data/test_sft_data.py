"""Instruction batches for the loop (mindspeed_train.data.sft), checked against direct formulas:
epoch order, next-token targets inside samples, padding / variable lengths, THD layout, and the
split / weighted blend done by megatron's BlendedMegatronDatasetBuilder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mindspeed_train.data.gpt import PretrainingCollator
from mindspeed_train.data.sft import (
    InstructionCollator,
    build_instruction_datasets,
    epoch_order,
    padded_length,
    shift_targets,
    thd_layout,
)
from mindspeed_train.data.writer import IndexedWriter

pytest.importorskip("megatron.core.datasets.indexed_dataset")


def _write(prefix: str, samples: list[tuple[list[int], list[int], list[int]]]) -> str:
    names = {key: f"{prefix}_packed_{key}_document" for key in ("input_ids", "attention_mask", "labels")}
    with IndexedWriter(names) as writer:
        for ids, labels, mask in samples:
            writer.add("input_ids", ids)
            writer.add("labels", labels)
            writer.add("attention_mask", mask)
    return prefix


def test_epoch_order_is_whole_seeded_permutations():
    order = epoch_order(np.arange(5), 12, seed=3, shuffle=True)
    assert len(order) == 12
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5))
    assert list(order) == list(epoch_order(np.arange(5), 12, seed=3, shuffle=True))
    assert list(epoch_order(np.arange(5), 7, seed=3, shuffle=False)) == [0, 1, 2, 3, 4, 0, 1]


def test_targets_stay_inside_samples():
    labels = np.array([-100, 11, 12, -100, 21, 22])
    segments = np.array([1, 1, 1, 2, 2, 2])
    assert shift_targets(labels, segments).tolist() == [11, 12, -100, 21, 22, -100]


def test_padded_length():
    assert padded_length([5, 9], seq_length=32, variable=False, multiple=8) == 32
    assert padded_length([5, 9], seq_length=32, variable=True, multiple=8) == 16
    assert padded_length([30], seq_length=20, variable=True, multiple=8) == 20


def test_collator_rows_pad_and_mask():
    sample = {"input_ids": np.array([5, 6, 7]), "labels": np.array([-100, 6, 7]), "attention_mask": np.ones(3, int)}
    batch = InstructionCollator(seq_length=6, pad_id=0)([sample])
    assert batch["tokens"].tolist() == [[5, 6, 7, 0, 0, 0]]
    assert batch["labels"].tolist() == [[6, 7, 0, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]
    assert "segments" not in batch


def test_packed_collator_and_thd_layout():
    pack = {"input_ids": np.array([1, 2, 3, 4, 5]), "labels": np.array([1, 2, 3, -100, 5]),
            "attention_mask": np.array([1, 1, 2, 2, 2])}  # fmt: skip
    batch = InstructionCollator(seq_length=8, pad_id=0, packed=True)([pack, pack])
    assert batch["segments"][0].tolist() == [1, 1, 2, 2, 2, 3, 3, 3]
    assert batch["position_ids"][0].tolist() == [0, 1, 0, 1, 2, 0, 1, 2]
    assert batch["labels"][0].tolist() == [2, 0, 0, 5, 0, 0, 0, 0]
    cu, longest = thd_layout(batch["segments"])
    assert cu.tolist() == [0, 2, 5, 8, 10, 13, 16] and cu.dtype == torch.int32 and longest == 3


def test_eod_segments_for_pretraining():
    sample = {"tokens": np.array([4, 9, 0, 7, 0, 8]), "labels": np.zeros(6, int), "loss_mask": np.ones(6),
              "position_ids": np.arange(6)}  # fmt: skip
    batch = PretrainingCollator(eod=0)([sample])
    assert batch["segments"].tolist() == [[1, 1, 1, 2, 2, 3]]  # the EOD closes its own document
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]


def test_split_and_weighted_blend(tmp_path):
    a = _write(str(tmp_path / "a"), [([i, i + 1], [i, i + 1], [1, 1]) for i in range(1, 41)])
    b = _write(str(tmp_path / "b"), [([100 + i, 1], [100 + i, 1], [1, 1]) for i in range(40)])
    train, valid = build_instruction_datasets((a,), split="80,20,0", seq_length=8, seed=1, num_samples=32,
                                              valid_samples=None, shuffle=False)  # fmt: skip
    assert [int(train[i]["input_ids"][0]) for i in range(32)] == list(range(1, 33))
    assert sorted(int(valid[i]["input_ids"][0]) for i in range(len(valid))) == list(range(33, 41))
    blend, _ = build_instruction_datasets(("0.75", a, "0.25", b), split="100,0,0", seq_length=8, seed=1,
                                          num_samples=400, valid_samples=0)  # fmt: skip
    from_b = sum(int(blend[i]["input_ids"][0]) >= 100 for i in range(400))
    assert from_b == 100  # megatron's blend draws the weights exactly (greedy error minimisation)
