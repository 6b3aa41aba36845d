"""Make this directory's helper modules (kernels_naive, fake_torch_npu) importable from tests in
sub-directories (pytest runs with --import-mode=importlib, which adds nothing to sys.path)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
