"""The vl-train README's and docs page's Python examples run, and the docs' memory table is the generated one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vl_train.memory import memory_table

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "packages/vl-train/README.md", ROOT / "docs/packages/vl-train.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_snippets_run(page: Path) -> None:
    if not page.exists():
        pytest.skip(f"{page} is not in this checkout")
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL)
    assert blocks
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)


def test_memory_table_is_generated() -> None:
    page = PAGES[1]
    if not page.exists():
        pytest.skip(f"{page} is not in this checkout")
    assert memory_table(chunk_size=2048) in page.read_text()
