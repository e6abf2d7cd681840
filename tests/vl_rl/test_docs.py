"""The vl-rl README's and docs page's Python examples run."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
_TRAIN_EXTRA = ("vl_train", "vl_model", "transformers")
PAGES = [ROOT / "packages/vl-rl/README.md", ROOT / "docs/packages/vl-rl.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_snippets_run(page: Path) -> None:
    if not page.exists():
        pytest.skip(f"{page} is not in this checkout")
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL)
    assert blocks
    namespace: dict[str, object] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared CPU
    try:
        for number, block in enumerate(blocks, 1):
            missing = [m for m in _TRAIN_EXTRA if m in block and importlib.util.find_spec(m) is None]
            if missing:  # the core blocks before it ran; the rest need the `train` extra
                pytest.skip(f"{page.name} block {number} needs {missing} (pip install 'vl-rl[train]')")
            exec(compile(block, str(page), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
