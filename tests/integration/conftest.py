"""Makes this folder's helpers and those of the vl_train tests importable under pytest's importlib mode."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
for folder in (HERE, HERE.parent / "vl_train", HERE.parent / "vl_rl"):
    sys.path.insert(0, str(folder))
