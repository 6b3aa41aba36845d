"""Pretraining samples: megatron's GPTDataset over our indexed output, and the per-DP-rank order."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_helpers as th  # noqa: E402

from mindspeed_train.data.gpt import PretrainingBatches, build_train_dataset  # noqa: E402


def test_dp_ranks_split_each_global_batch_like_one_rank_with_accumulation():
    one = [i for batch in PretrainingBatches(16, 0, micro=1, dp_rank=0, dp_size=1) for i in batch]
    ranks = [list(PretrainingBatches(16, 0, micro=1, dp_rank=r, dp_size=2)) for r in range(2)]
    # microbatch j of DP rank r is sample 2j + r: the same 4 samples per global batch of 4.
    assert [b for pair in zip(*ranks, strict=True) for b in pair] == [[i] for i in one] == [[i] for i in range(16)]
    assert list(PretrainingBatches(16, 8, micro=2, dp_rank=1, dp_size=2)) == [[10, 11], [14, 15]]
    with pytest.raises(ValueError, match="consumed samples 3"):
        PretrainingBatches(16, 3, micro=2, dp_rank=0, dp_size=1)


def test_gpt_dataset_reads_preprocess_output(tmp_path):
    prefix = th.write_corpus(str(tmp_path), documents=16)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = IndexedDataset(prefix)
    stream = np.concatenate([docs[i] for i in range(len(docs))])
    data = build_train_dataset((prefix,), split="100,0,0", seq_length=16, seed=1, num_samples=12, eod=th.EOS,
                               vocab_size=th.VOCAB, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert len(data) >= 12
    text = " ".join(map(str, stream.tolist()))
    for i in range(12):
        sample = data[i]
        tokens, labels = sample["tokens"].numpy(), sample["labels"].numpy()
        assert tokens.shape == (16,) and np.array_equal(tokens[1:], labels[:-1])
        assert sample["loss_mask"].sum() == 16 and sample["position_ids"].tolist() == list(range(16))
        # Documents are shuffled but each one is intact: a run of counting tokens up to an EOS.
        for a, b in zip(tokens[:-1], tokens[1:], strict=True):
            assert b == th.EOS or a == th.EOS or b == a % (th.VOCAB - 1) + 1
    assert text  # the corpus is not empty
    with pytest.raises(ValueError, match="--data-path .*missing_text_document: no"):
        build_train_dataset((str(tmp_path / "missing_text_document"),), split="1,0,0", seq_length=16, seed=1,
                            num_samples=1, eod=0, vocab_size=256)  # fmt: skip


def test_weighted_blend_of_two_corpora(tmp_path):
    """megatron's blend syntax: two corpora drawn 3:1 (its blend index meets the weights exactly
    on a multiple of 4 samples); a weighted blend cannot ask for a one-pass validation split."""
    a = th.write_corpus(str(tmp_path / "a"), documents=32, seed=1)
    b = th.write_corpus(str(tmp_path / "b"), documents=32, seed=2)
    # no cache_dir: megatron caches blend indices on global rank 0 only (a process group)
    common = {"split": "100,0,0", "seq_length": 16, "seed": 1, "eod": th.EOS, "vocab_size": th.VOCAB}
    from mindspeed_train.data.gpt import build_datasets

    data = build_train_dataset(("0.75", a, "0.25", b), num_samples=40, **common)
    assert sum(int(data[i]["dataset_id"]) == 1 for i in range(40)) == 10
    with pytest.raises(ValueError, match="--eval-iters -1"):
        build_datasets(("0.75", a, "0.25", b), num_samples=40, valid_samples=None, **common)
