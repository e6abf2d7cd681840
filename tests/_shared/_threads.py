"""One torch thread for a block: the reference process of a multi-rank test must run the kernels (and the
reduction orders) its one-thread ranks run, or AdamW turns the rounding of tiny gradients into visible
weight differences."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """``torch.set_num_threads(1)`` inside the block, the previous count restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
