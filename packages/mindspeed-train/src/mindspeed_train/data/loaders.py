"""The loop's data: train and validation microbatch iterators for this data-parallel rank, from
pretraining documents (megatron's GPTDataset) or instruction data (:mod:`.sft`), resuming where a
checkpoint left them."""

from __future__ import annotations

from mindspeed_train.config import TrainConfig


def _datasets(config: TrainConfig, num_samples: int, valid_samples: int | None, eod: int, vocab_size: int):
    batch, data = config.batch, config.data
    if data.instruction:
        from mindspeed_train.data.sft import build_instruction_datasets

        return build_instruction_datasets(config.data_path, split=config.split, seq_length=batch.seq_length,
                                          seed=config.seed, num_samples=num_samples, valid_samples=valid_samples,
                                          shuffle=data.shuffle)  # fmt: skip
    from mindspeed_train.data.gpt import build_datasets

    return build_datasets(config.data_path, split=config.split, seq_length=batch.seq_length, seed=config.seed,
                          num_samples=num_samples, valid_samples=valid_samples, eod=eod, vocab_size=vocab_size)  # fmt: skip


def _collator(config: TrainConfig, train, eod: int):
    data = config.data
    if not data.instruction:
        from mindspeed_train.data.gpt import PretrainingCollator

        return PretrainingCollator(eod=eod if data.packed else None)
    from mindspeed_train.data.sft import InstructionCollator

    if not data.packed and _segmented(train):
        raise ValueError(f"--data-path {' '.join(config.data_path)}: the data is neat-packed; pass --neat-pack so "
                         "packed samples do not attend to each other")  # fmt: skip
    return InstructionCollator(seq_length=config.batch.seq_length, pad_id=eod, packed=data.packed,
                               variable=data.variable, multiple=data.pad_to_multiple_of)  # fmt: skip


def _segmented(dataset) -> bool:
    """Whether any instruction dataset behind ``dataset`` (plain or megatron's blend) holds neat packs."""
    parts = getattr(dataset, "datasets", [dataset])
    return any(part.dataset.has_segments() for part in parts)


def build_loaders(config: TrainConfig, job, eod: int):
    """(train iterator, validation iterator or None, eval iterations). Both resume where the
    checkpoint left them: training after ``consumed_samples``, validation after the evaluations
    already run (megatron's rule: iteration // eval_interval evaluations of eval_iters batches).
    ``eod`` ends pretraining documents and pads instruction rows."""
    from megatron.core import parallel_state as ps

    from mindspeed_train.data.gpt import make_loader

    batch, interval, iters = config.batch, config.eval.interval, config.eval.iters
    # megatron sizes the validation set for every evaluation plus one; -1: one pass over the split.
    evals = config.train_iters // interval + 1 if interval else 0
    valid_samples = (None if iters == -1 else evals * iters * batch.global_) if interval else 0
    train, valid = _datasets(config, config.train_iters * batch.global_, valid_samples, eod, job.spec.vocab_size)
    collate = _collator(config, train, eod)
    dp = {"micro": batch.micro, "dp_rank": ps.get_data_parallel_rank(), "dp_size": ps.get_data_parallel_world_size(),
          "collate": collate}  # fmt: skip
    # megatron's interleaved schedule reads one iterator per virtual-pipeline chunk, each
    # yielding the same microbatches (the first chunk takes tokens, the last labels)
    chunks = config.parallel.virtual or 1

    def loaders(dataset, consumed):
        its = [make_loader(dataset, consumed=consumed, **dp) for _ in range(chunks)]
        return its if chunks > 1 else its[0]

    train_data = loaders(train, job.consumed_samples)
    if iters == -1 and valid is not None:
        iters = len(valid) // (evals * batch.global_)  # the schema: no evaluation when the split is too small
    if valid is None or iters <= 0:
        return train_data, None, 0
    consumed = (job.iteration // interval) * iters * batch.global_
    return train_data, loaders(valid, consumed), iters
