"""Makes the examples' modules importable under pytest's importlib mode (``examples/demo``, ``examples/adapter_transfer``)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "demo"))
# after the demo: both examples have a run.py, and ``import run`` must stay the demo's
sys.path.append(str(Path(__file__).resolve().parents[2] / "examples" / "adapter_transfer"))
