"""Suite-wide pytest setup: Triton interpreter on CPU, ``gpu`` marker, per-test seeding, ``triton_device``."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run in the Triton interpreter on CPU tensors. The variable is read
# when `triton` / `@triton.jit` is first imported, so it must be set here, before pytest imports any
# test module (conftest.py is imported first). setdefault: an explicit TRITON_INTERPRET=0 wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Helpers shared by several packages' tests (e.g. the per-call time budget of the property tests); this
# conftest is loaded for every test folder, the isolated per-package runs included.
sys.path.insert(0, str(Path(__file__).parent / "_shared"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests when CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_device() -> str:
    """Device for Triton kernel tests: ``"cuda"`` if available, else ``"cpu"`` (Triton interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton not installed")
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed_every_test() -> None:
    """Seed torch and ``random`` before each test.

    Without it a test's random inputs depend on which tests ran before it in the same process, so a
    tolerance that holds for nearly every draw can fail only in one session's ordering (the isolated
    per-package sessions run a different subset than the full suite).
    """
    torch.manual_seed(0)
    random.seed(0)
