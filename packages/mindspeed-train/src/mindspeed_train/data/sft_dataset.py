"""megatron-core's dataset classes for instruction data (imported only when a job builds one:
megatron's dataset modules are heavy): :class:`InstructionDataset` over
:class:`~mindspeed_train.data.sft.InstructionSequences`, so megatron's
``BlendedMegatronDatasetBuilder`` does ``--split`` and weighted blends."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset

from mindspeed_train.data.sft import InstructionSequences, epoch_order


@dataclass
class InstructionDatasetConfig(BlendedMegatronDatasetConfig):
    """megatron's dataset config plus ``shuffle`` (False: ``--no-shuffle``, file order)."""

    shuffle: bool = True


class InstructionDataset(MegatronDataset):
    """Samples = the split's sequences in per-epoch permutations; item -> dict of int64 arrays
    ``input_ids``, ``labels``, ``attention_mask`` (variable length; the collator pads)."""

    def __init__(self, dataset, dataset_path, indices, num_samples, index_split, config) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        self.order = epoch_order(indices, num_samples, seed=config.random_seed, shuffle=config.shuffle)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config) -> InstructionSequences:
        return InstructionSequences(dataset_path, mmap=config.mmap_bin_files)

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return [*MegatronDataset._key_config_attributes(), "shuffle"]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        ids, labels, mask = self.dataset.get(int(self.order[idx]))
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
