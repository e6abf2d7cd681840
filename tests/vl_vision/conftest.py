"""Helpers of the vision-tower tests: tiny configs, random inputs, transformers references.

Also makes this folder's helper modules importable under pytest's importlib mode.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
