"""The vl-train README's Python example runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[2] / "packages/vl-train/README.md"


def test_readme_snippets_run() -> None:
    if not PAGE.exists():
        pytest.skip(f"{PAGE} is not in this checkout")
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.DOTALL)
    assert blocks
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)
