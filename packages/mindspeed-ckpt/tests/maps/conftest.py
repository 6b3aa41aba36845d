"""Make this directory's helper module (ckpt_tiny_configs) importable: pytest runs with
--import-mode=importlib, which adds nothing to sys.path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
