"""The documentation runs: module doctests, every ```python block of the vl-rope pages, the example."""

from __future__ import annotations

import doctest
import importlib
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "packages/vl-rope/README.md", ROOT / "docs/packages/vl-rope.md"]
FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)


@pytest.mark.parametrize("module", ["vl_rope.rope", "vl_rope.mrope", "vl_rope.vision", "vl_rope.scaling"])
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_snippets_run(page: Path) -> None:
    if not page.exists():
        pytest.skip(f"{page} is not in this checkout")
    blocks = FENCE.findall(page.read_text())
    assert blocks, f"{page} has no python examples"
    namespace: dict[str, object] = {}
    for block in blocks:  # blocks on one page build on each other, like a reader running them in order
        if "apply_rotary_fused" in block and not _fused_kernel_runs_here():
            continue
        exec(compile(block, str(page), "exec"), namespace)


def _fused_kernel_runs_here() -> bool:
    import os

    import torch

    from vl_rope import HAS_TRITON

    return HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def test_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(ROOT / "examples/rope_quickstart.py"), run_name="__main__")
    assert "positions of the next 3 generated tokens" in capsys.readouterr().out
