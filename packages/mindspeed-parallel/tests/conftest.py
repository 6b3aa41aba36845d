"""Puts tests/pipeline on sys.path so that the pipeline tests (and run_world's spawned children,
which inherit sys.path) can import their shared ``pipeline_cases`` module (pytest runs with
--import-mode=importlib, which adds nothing to sys.path)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
for folder in (HERE / "pipeline",):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
