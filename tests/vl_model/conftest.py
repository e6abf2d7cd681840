"""Makes this folder's helper modules (``_core_helpers`` and the other helpers') importable under importlib mode."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
