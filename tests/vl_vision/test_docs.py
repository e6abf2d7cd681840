"""The vl-vision tower documentation runs: doctests of the tower modules, README and page examples."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "packages/vl-vision/README.md", ROOT / "docs/packages/vl-vision.md"]
FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)


@pytest.mark.parametrize("module", ["vl_vision.tower", "vl_vision.merger", "vl_vision.siglip2"])
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_snippets_run(page: Path) -> None:
    if not page.exists():
        pytest.skip(f"{page} is not in this checkout")
    blocks = FENCE.findall(page.read_text())
    assert blocks, f"{page} has no python examples"
    namespace: dict[str, object] = {}
    for block in blocks:  # blocks of one page build on each other, as a reader runs them
        exec(compile(block, str(page), "exec"), namespace)
