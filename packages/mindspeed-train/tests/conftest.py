"""Puts this directory on sys.path so that test modules (and run_world's spawned children, which
inherit sys.path) can import ``train_helpers``."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
