"""The kernel design page runs: every ```python block of ``docs/packages/vl-moe-kernels.md``.

The page creates its tensors with plain ``torch.randn`` (no device), so the blocks run under a
default-device context: CUDA where there is a GPU (the compiled kernels), else the CPU under
Triton's interpreter. Without either (a CPU run with ``TRITON_INTERPRET=0``) the test skips and
says why, instead of failing on CPU tensors the compiled kernels cannot take.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

PAGE = Path(__file__).resolve().parents[2] / "docs/packages/vl-moe-kernels.md"
FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)


def snippet_device() -> str | None:
    """``"cuda"`` with a GPU, ``"cpu"`` under Triton's interpreter, ``None`` where the kernels cannot run."""
    if torch.cuda.is_available():
        return "cuda"
    from vl_moe.kernels import _common

    return "cpu" if _common.INTERPRET else None


def test_kernel_page_snippets_run() -> None:
    if not PAGE.exists():
        pytest.skip(f"{PAGE} is not in this checkout")
    device = snippet_device()
    if device is None:
        pytest.skip("no CUDA and no Triton interpreter (set TRITON_INTERPRET=1 before the kernels are first imported)")
    blocks = FENCE.findall(PAGE.read_text())
    assert blocks, f"{PAGE} has no python examples"
    namespace: dict[str, object] = {}
    with torch.device(device):
        for block in blocks:
            exec(compile(block, str(PAGE), "exec"), namespace)
    x = namespace["x"]
    assert isinstance(x, torch.Tensor) and x.device.type == device
    assert x.grad is not None


def test_page_test_skips_cleanly_without_cuda_or_interpreter() -> None:
    """Where the compiled kernels are chosen but there is no GPU, the page test skips (it used to raise)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the page runs on it")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"{__file__}::test_kernel_page_snippets_run"],
        env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 skipped" in proc.stdout and "no CUDA and no Triton interpreter" in proc.stdout, proc.stdout[-2000:]
