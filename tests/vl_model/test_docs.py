"""The vl-model documentation runs: every ```python block of its README and docs page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "packages/vl-model/README.md", ROOT / "docs/packages/vl-model.md"]
FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_snippets_run(page: Path) -> None:
    if not page.exists():
        pytest.skip(f"{page} is not in this checkout")
    blocks = FENCE.findall(page.read_text())
    assert blocks, f"{page} has no python examples"
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)
