"""Instruction (SFT) data for the loop: `mindspeed preprocess` instruction output as a megatron
``MegatronDataset``, so megatron's ``BlendedMegatronDatasetBuilder`` does ``--split`` and weighted
blends (``--data-path W1 P1 W2 P2``) exactly as it does for pretraining.

``--data-path PREFIX`` names what ``mindspeed preprocess --output-prefix PREFIX`` wrote for
instruction data: ``PREFIX_packed_{input_ids,attention_mask,labels}_document.{bin,idx}``. One
sample is one sequence of those datasets (one conversation, or one pack). Samples are served in a
fresh permutation of the split's sequences each epoch (seeded; ``--no-shuffle``: in file order),
for as many epochs as the requested number of samples needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from mindspeed_train.data.gpt import split_sizes
from mindspeed_train.data.instruction import KEYS
from mindspeed_train.data.writer import dataset_prefix


def instruction_files(prefix: str) -> dict[str, str]:
    """key -> indexed-dataset prefix of the three instruction datasets under ``prefix``."""
    return {key: dataset_prefix(prefix, f"packed_{key}") for key in KEYS}


def _check_files(prefix: str) -> None:
    for path in instruction_files(prefix).values():
        if not (os.path.isfile(f"{path}.bin") and os.path.isfile(f"{path}.idx")):
            raise ValueError(f"--data-path {prefix}: no {path}.bin/.idx; with --is-instruction-dataset pass the "
                             "--output-prefix of `mindspeed preprocess --handler-name ...`")  # fmt: skip


class InstructionSequences:
    """The three indexed datasets of one prefix, read together: ``get(i)`` -> (input_ids, labels,
    attention_mask) int64 arrays of sequence ``i`` (equal lengths)."""

    def __init__(self, prefix: str, mmap: bool = True) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        _check_files(prefix)
        files = instruction_files(prefix)
        self.parts = {key: IndexedDataset(path, mmap=mmap) for key, path in files.items()}
        sizes = {key: len(part) for key, part in self.parts.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"--data-path {prefix}: the instruction datasets disagree in size {sizes}; run preprocess again")
        self.prefix = prefix

    def __len__(self) -> int:
        return len(self.parts["input_ids"])

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, labels, mask = (np.asarray(self.parts[key][index], dtype=np.int64)
                             for key in ("input_ids", "labels", "attention_mask"))
        if not len(ids) == len(labels) == len(mask):
            raise ValueError(f"--data-path {self.prefix}: sequence {index} has unequal input_ids/labels/attention_mask")
        return ids, labels, mask

    def has_segments(self, probe: int = 64) -> bool:
        """Whether the data was neat-packed: any of the first ``probe`` attention masks numbers
        more than one sample."""
        masks = self.parts["attention_mask"]
        return any(int(np.max(masks[i], initial=0)) > 1 for i in range(min(probe, len(masks))))


def epoch_order(indices: np.ndarray, num_samples: int | None, *, seed: int, shuffle: bool) -> np.ndarray:
    """Sequence ids for ``num_samples`` samples (None: one epoch): whole epochs over ``indices``,
    each a fresh permutation from one seeded generator (``shuffle`` False: file order)."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return indices
    total = len(indices) if num_samples is None else num_samples
    epochs = -(-total // len(indices))
    rng = np.random.RandomState(seed)
    parts = [rng.permutation(indices) if shuffle else indices for _ in range(epochs)]
    return np.concatenate(parts)[:total]


def build_instruction_datasets(data_path: tuple[str, ...], *, split: str, seq_length: int, seed: int,
                               num_samples: int, valid_samples: int | None, shuffle: bool = True):
    """(train, validation or None) instruction datasets; the arguments mean what they mean for
    :func:`mindspeed_train.data.gpt.build_datasets`."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.utils import get_blend_from_list

    for prefix in data_path[1::2] if len(data_path) > 1 else data_path:
        _check_files(prefix)
    from mindspeed_train.data.sft_dataset import InstructionDataset, InstructionDatasetConfig

    config = InstructionDatasetConfig(random_seed=seed, sequence_length=seq_length, blend=get_blend_from_list(list(data_path)),
                        split=split, path_to_cache=None, mmap_bin_files=True, shuffle=shuffle)  # fmt: skip
    sizes = split_sizes(data_path, num_samples, valid_samples)
    train, valid, _ = BlendedMegatronDatasetBuilder(InstructionDataset, sizes, lambda: True, config).build()
    if train is None or len(train) < num_samples:
        raise ValueError(f"--split {split!r} leaves no training sequences; give the train split a share, e.g. 100,0,0")
    return train, valid if valid_samples != 0 else None


def shift_targets(labels: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Next-token targets: position t predicts ``labels[t + 1]`` when t + 1 is in the same sample
    (same ``segments`` value), else nothing (-100). The last position predicts nothing."""
    targets = np.full_like(labels, -100)
    same = segments[1:] == segments[:-1]
    targets[:-1] = np.where(same, labels[1:], -100)
    return targets


def padded_length(lengths: list[int], *, seq_length: int, variable: bool, multiple: int) -> int:
    """Row length of a microbatch: ``seq_length``, or with ``variable`` the longest sample rounded
    up to ``multiple`` (at most ``seq_length``)."""
    if not variable:
        return seq_length
    longest = max(lengths)
    multiple = max(multiple, 1)
    return min(seq_length, -(-longest // multiple) * multiple)


@dataclass(frozen=True)
class InstructionCollator:
    """Pads/cuts instruction samples into one microbatch.

    Returns ``tokens``, ``labels`` (targets, 0 where masked), ``loss_mask`` (1.0 where a target
    exists) and ``position_ids``, each ``[micro, S]``, plus ``segments`` ``[micro, S]`` (1-based
    sample id within the row, the padding tail its own id) when ``packed``: the loop then feeds the
    row as THD with cu_seqlens so samples never attend to each other.
    """

    seq_length: int
    pad_id: int
    packed: bool = False
    variable: bool = False
    multiple: int = 8

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [min(len(s["input_ids"]), self.seq_length) for s in samples]
        width = padded_length(lengths, seq_length=self.seq_length, variable=self.variable, multiple=self.multiple)
        rows = [self._row(s, width) for s in samples]
        out = {key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in rows[0]}
        out["loss_mask"] = out["loss_mask"].float()
        return out

    def _row(self, sample: dict, width: int) -> dict[str, np.ndarray]:
        ids, labels = sample["input_ids"][:width], sample["labels"][:width]
        segments = sample["attention_mask"][:width] if self.packed else np.ones(len(ids), dtype=np.int64)
        pad = width - len(ids)
        # the padding tail is one more segment (never a target, attends only to itself)
        segments = np.concatenate([segments, np.full(pad, int(segments.max(initial=0)) + 1, dtype=np.int64)])
        ids = np.concatenate([ids, np.full(pad, self.pad_id, dtype=np.int64)])
        labels = np.concatenate([labels, np.full(pad, -100, dtype=np.int64)])
        targets = shift_targets(labels, segments)
        row = {"tokens": ids, "labels": np.where(targets < 0, 0, targets), "loss_mask": (targets >= 0).astype(np.float32),
               "position_ids": _positions(segments)}  # fmt: skip
        if self.packed:
            row["segments"] = segments
        return row


def _positions(segments: np.ndarray) -> np.ndarray:
    """0, 1, ... restarting at each new segment."""
    starts = np.flatnonzero(np.diff(segments, prepend=segments[0] - 1))
    lengths = np.diff(np.append(starts, len(segments)))
    return np.arange(len(segments)) - np.repeat(starts, lengths)


def thd_layout(segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 ``[n + 1]``, longest segment) of a ``[micro, S]`` segment-id batch laid
    out as one sequence of ``micro x S`` tokens (row after row; a row boundary always starts a
    new segment)."""
    flat = segments.reshape(-1)
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    width = segments.shape[-1]
    change[::width] = True
    starts = torch.nonzero(change).reshape(-1)
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())
