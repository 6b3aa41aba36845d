"""Read raw records from jsonl / json / parquet / plain-text files and directories.

Every record is yielded with where it came from (``file:line``) so that bad input can be
reported in one line that names the place to fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


class DataError(ValueError):
    """Bad input data (a missing file, an unparsable line, a missing key): exit code 2."""


@dataclass(frozen=True)
class Record:
    """One raw sample: ``where`` is ``"path:line"`` (line 1-based; row index for parquet)."""

    where: str
    data: dict[str, Any]


def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Files named by ``inputs`` (files, directories walked in sorted order, comma lists).

    Raises DataError naming the first path that does not exist or a directory with no files.
    """
    files: list[str] = []
    for item in inputs:
        for path in (p for p in str(item).split(",") if p):
            if os.path.isfile(path):
                files.append(path)
            elif os.path.isdir(path):
                found = sorted(
                    os.path.join(root, name)
                    for root, _dirs, names in os.walk(path)
                    for name in names
                    if not name.startswith(".")
                )
                if not found:
                    raise DataError(f"--input {path}: the directory holds no files")
                files.extend(found)
            else:
                raise DataError(f"--input {path}: no such file or directory")
    if not files:
        raise DataError("--input names no files; pass a jsonl/json/parquet/text file or a directory")
    return files


def read_records(files: Iterable[str]) -> Iterator[Record]:
    """Records of every file in order; plain-text files give one record ``{"text": whole file}``."""
    for path in files:
        lower = path.lower()
        if lower.endswith(PARQUET_SUFFIXES):
            yield from _read_parquet(path)
        elif lower.endswith(JSON_SUFFIXES):
            yield from _read_json(path)
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield Record(f"{path}:1", {"text": f.read()})


def _read_json(path: str) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):  # a single JSON array, as alpaca_data.json ships
            yield from _read_json_array(path, f.read())
            return
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            yield Record(f"{path}:{lineno}", obj)


def _read_json_array(path: str, text: str) -> Iterator[Record]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    for index, obj in enumerate(items):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: item {index} is a {type(obj).__name__}, expected a JSON object")
        yield Record(f"{path}:item {index}", obj)


def _read_parquet(path: str) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install 'mindspeed-train[parquet]'") from None
    table = pq.read_table(path)
    row = 0
    for batch in table.to_batches():
        for obj in batch.to_pylist():
            yield Record(f"{path}:row {row}", obj)
            row += 1


def field_text(record: Record, key: str) -> str:
    """``record.data[key]`` as a string; DataError naming file:line and the key when it is missing."""
    if key not in record.data:
        keys = ", ".join(sorted(record.data)[:8])
        raise DataError(f"{record.where}: no key {key!r} (keys: {keys}); set --json-keys or --map-keys to the right column")
    value = record.data[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{record.where}: key {key!r} holds a {type(value).__name__}, expected a string")
    return value
