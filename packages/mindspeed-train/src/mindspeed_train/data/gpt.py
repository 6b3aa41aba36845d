"""Pretraining batches: megatron-core's ``GPTDataset`` over `mindspeed preprocess` output, one
DataLoader per data-parallel rank that can start at any consumed-sample position (exact resume).

Sample order follows megatron's pretraining sampler: global batch ``i`` holds the dataset samples
``[i * G, (i + 1) * G)``; microbatch ``j`` of it is the next ``micro x DP`` samples, of which DP rank
``r`` takes the ``r``-th run of ``micro``. So DP2 and DP1 with twice the accumulation see the same
samples per step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _SpecialTokens:
    """The two facts megatron's GPTDataset asks its tokenizer for."""

    eod: int
    vocab_size: int

    @property
    def unique_identifiers(self) -> dict:
        # megatron hashes the dataset description (tokenizer included) into its index-cache names.
        return {"class": "mindspeed_train.SpecialTokens", "eod": self.eod, "vocab_size": self.vocab_size}


def build_train_dataset(data_path: tuple[str, ...], *, split: str, seq_length: int, seed: int, num_samples: int,
                        eod: int, vocab_size: int, cache_dir: str | None = None):
    """megatron's (blended) GPTDataset of at least ``num_samples`` samples of ``seq_length`` tokens.

    ``data_path``: ``PREFIX`` or ``W1 PREFIX1 W2 PREFIX2 ...`` (megatron's blend syntax); each prefix
    must have ``.bin`` and ``.idx``. Indices are cached under ``cache_dir`` (default: next to the data).
    Must be called on every rank (megatron builds the index cache on rank 0 first)."""
    train, _ = build_datasets(data_path, split=split, seq_length=seq_length, seed=seed, num_samples=num_samples,
                              valid_samples=0, eod=eod, vocab_size=vocab_size, cache_dir=cache_dir)  # fmt: skip
    return train


def build_datasets(data_path: tuple[str, ...], *, split: str, seq_length: int, seed: int, num_samples: int,
                   valid_samples: int | None, eod: int, vocab_size: int, cache_dir: str | None = None):
    """(train, validation) GPTDatasets of the ``split``'s first two shares, as in
    :func:`build_train_dataset`. ``valid_samples``: samples the validation dataset must offer (0: do
    not build it, None: one pass over its documents). The validation dataset is None when the split
    gives it no share."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    for prefix in data_path[1::2] if len(data_path) > 1 else data_path:
        if not os.path.isfile(f"{prefix}.idx") or not os.path.isfile(f"{prefix}.bin"):
            raise ValueError(f"--data-path {prefix}: no {prefix}.bin/.idx; write them with `mindspeed preprocess`")
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=get_blend_from_list(list(data_path)), split=split,
        tokenizer=_SpecialTokens(eod=eod, vocab_size=vocab_size), reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, path_to_cache=cache_dir, mmap_bin_files=True,
    )  # fmt: skip
    sizes = split_sizes(data_path, num_samples, valid_samples)
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    if train is None or len(train) < num_samples:
        raise ValueError(f"--split {split!r} leaves no training samples; give the train split a share, e.g. 100,0,0")
    if valid is not None and valid_samples and len(valid) < valid_samples:
        raise ValueError(f"--split {split!r}: the validation split has {len(valid)} samples, {valid_samples} needed")
    return train, valid if valid_samples != 0 else None


def split_sizes(data_path: tuple[str, ...], num_samples: int, valid_samples: int | None) -> list[int | None]:
    """megatron's builder sizes (train, validation, test). None asks for one pass over a split's
    documents, which megatron allows only for an unweighted ``--data-path``; a weighted blend needs a
    count for every split (0: not used)."""
    if len(data_path) == 1:
        return [num_samples, valid_samples or None, None]
    if valid_samples is None:
        raise ValueError("--eval-iters -1 (one pass over the validation split) needs an unweighted --data-path; "
                         "pass a positive --eval-iters with a weighted blend")  # fmt: skip
    return [num_samples, valid_samples, 0]


class PretrainingBatches:
    """Index lists for one data-parallel rank, starting after ``consumed`` samples (a multiple of
    the global batch). Used as a DataLoader ``batch_sampler``."""

    def __init__(self, total: int, consumed: int, micro: int, dp_rank: int, dp_size: int) -> None:
        if consumed % (micro * dp_size):
            raise ValueError(f"consumed samples {consumed} is not a multiple of micro x DP = {micro * dp_size}")
        self.total, self.consumed, self.micro, self.dp_rank, self.dp_size = total, consumed, micro, dp_rank, dp_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.micro * self.dp_size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro * self.dp_size
        for start in range(self.consumed, self.total - step + 1, step):
            first = start + self.dp_rank * self.micro
            yield list(range(first, first + self.micro))


@dataclass(frozen=True)
class PretrainingCollator:
    """Stacks GPTDataset samples into ``tokens``, ``labels``, ``loss_mask``, ``position_ids``
    (``[micro, seq]``). With ``eod`` set (``--reset-attention-mask``) also ``segments``: a new
    document starts after each EOD token, so the loop attends within documents only (THD) and
    ``position_ids`` restart there."""

    eod: int | None = None

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        keys = ("tokens", "labels", "loss_mask", "position_ids")
        out = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in keys}
        if self.eod is not None:
            ends = (out["tokens"] == self.eod).long()
            out["segments"] = 1 + torch.cumsum(ends, dim=1) - ends  # the EOD closes its own document
            starts = torch.ones_like(ends, dtype=torch.bool)
            starts[:, 1:] = out["segments"][:, 1:] != out["segments"][:, :-1]
            index = torch.arange(ends.shape[1]).expand_as(ends)
            first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
            out["position_ids"] = index - first
        return out


def make_loader(dataset, *, consumed: int, micro: int, dp_rank: int, dp_size: int,
                collate=None) -> Iterator[dict[str, torch.Tensor]]:
    """An iterator of microbatches for this DP rank, resuming after ``consumed`` samples.
    ``collate`` turns a list of samples into one microbatch (default: :class:`PretrainingCollator`,
    dicts of ``tokens``, ``labels``, ``loss_mask``, ``position_ids``, each ``[micro, seq]``)."""
    sampler = PretrainingBatches(len(dataset), consumed, micro, dp_rank, dp_size)
    # num_workers=0: samples are memory-mapped slices, cheap enough to read in the training process.
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate or PretrainingCollator(),
                                            num_workers=0))  # fmt: skip
