"""The processing documentation runs: module doctests and every ```python block of its page; no torchvision import."""

from __future__ import annotations

import doctest
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs/packages/vl-vision-processing.md"
FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)


@pytest.mark.parametrize("module", ["vl_vision.processing.image", "vl_vision.processing.timestamps"])
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_page_snippets_run() -> None:
    if not PAGE.exists():
        pytest.skip(f"{PAGE} is not in this checkout")
    blocks = FENCE.findall(PAGE.read_text())
    assert blocks, f"{PAGE} has no python examples"
    for block in blocks:
        exec(compile(block, str(PAGE), "exec"), {})


def test_processing_never_imports_torchvision_or_transformers() -> None:
    code = (
        "import sys, vl_vision.processing as p; "
        "p.ImageProcessor(); p.VideoProcessor(); "
        "bad = [m for m in ('torchvision', 'transformers', 'av') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    src = str(Path(importlib.import_module("vl_vision.processing").__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return env
