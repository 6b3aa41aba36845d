"""Make the helper modules (models_hf_helpers, adaptor/models_mcore_helpers) importable by name
(pytest runs with --import-mode=importlib, which adds nothing to sys.path; run_world's spawned
children inherit this sys.path)."""

import sys
from pathlib import Path

HERE = Path(__file__).parent
for folder in (HERE, HERE / "adaptor"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
