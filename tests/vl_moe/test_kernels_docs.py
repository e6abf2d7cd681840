"""The kernel design page runs: every ```python block of ``docs/packages/vl-moe-kernels.md``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("triton")

PAGE = Path(__file__).resolve().parents[2] / "docs/packages/vl-moe-kernels.md"
FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)


def test_kernel_page_snippets_run() -> None:
    if not PAGE.exists():
        pytest.skip(f"{PAGE} is not in this checkout")
    blocks = FENCE.findall(PAGE.read_text())
    assert blocks, f"{PAGE} has no python examples"
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), namespace)
    x = namespace["x"]
    assert getattr(x, "grad", None) is not None
