"""Write Megatron indexed datasets (``.bin`` + ``.idx``) with megatron-core's own builder.

Files are written under temporary names and renamed only when every dataset of a run is
complete, so an interrupted run never leaves a prefix that megatron would load as valid.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np

# int32: token ids of every real vocabulary fit, and labels need the signed -100 ignore index.
TOKEN_DTYPE = np.int32


def dataset_prefix(output_prefix: str, key: str, level: str = "document") -> str:
    """``{output_prefix}_{key}_{level}``: the prefix megatron's ``--data-path`` takes."""
    return f"{output_prefix}_{key}_{level}"


class IndexedWriter:
    """Several indexed datasets written side by side, one per key, committed together.

    Use as a context manager: ``add(key, tokens)`` appends one document (one sequence) to the
    dataset of ``key``; leaving the block without an exception renames the temporary files to
    ``{prefix}.bin`` / ``{prefix}.idx``; an exception removes them.
    """

    def __init__(self, prefixes: dict[str, str], dtype: type = TOKEN_DTYPE) -> None:
        with warnings.catch_warnings():
            # megatron.core's package import warns about missing Transformer Engine / Apex, which
            # writing a dataset never uses; keep the command's output to what concerns the user.
            warnings.simplefilter("ignore", UserWarning)
            from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        for prefix in prefixes.values():
            parent = os.path.dirname(os.path.abspath(prefix))
            if not os.path.isdir(parent):
                raise ValueError(f"--output-prefix {prefix}: directory {parent} does not exist; create it first")
        self._final = dict(prefixes)
        self._tmp = {key: f"{prefix}.tmp-{os.getpid()}" for key, prefix in prefixes.items()}
        self._builders = {key: IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype) for key, tmp in self._tmp.items()}
        self.documents = 0

    def add(self, key: str, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one document of ``tokens`` (1-D ints) to the dataset of ``key``."""
        array = np.asarray(tokens, dtype=TOKEN_DTYPE)
        if array.ndim != 1:
            raise ValueError(f"tokens for {key!r} must be 1-D, got shape {array.shape}")
        self._builders[key].add_document(array, [int(array.size)])

    def __enter__(self) -> IndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._commit()
        else:
            self._discard()

    def _commit(self) -> None:
        for key, builder in self._builders.items():
            builder.finalize(f"{self._tmp[key]}.idx")
        for key, tmp in self._tmp.items():
            # .bin first, .idx last: a present .idx then always has its complete .bin beside it.
            os.replace(f"{tmp}.bin", f"{self._final[key]}.bin")
            os.replace(f"{tmp}.idx", f"{self._final[key]}.idx")

    def _discard(self) -> None:
        for key, builder in self._builders.items():
            builder.data_file.close()
            for suffix in (".bin", ".idx"):
                try:
                    os.remove(f"{self._tmp[key]}{suffix}")
                except FileNotFoundError:
                    pass
