"""Peak live tensor memory of a call, counted by a dispatch mode (deterministic, allocator-independent).

Every tensor an operator returns is counted by its storage until the last tensor that uses that
storage is freed; the peak of the running total is what the call needed beyond its inputs.
Scratch buffers inside a single kernel (e.g. an SDPA workspace) are not seen, on either side of a
comparison. RSS-based numbers are too noisy for this on a shared 2-core machine.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _PeakTensorMemory(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [bytes, tensors alive]

    def _release(self, ptr: int) -> None:
        entry = self._refs[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[ptr]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            try:
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
            except RuntimeError:  # FSDP2's unsharded parameters: storage resized in place, not a new allocation
                continue
            if ptr == 0:
                continue
            entry = self._refs.get(ptr)
            if entry is None:
                entry = self._refs[ptr] = [storage.nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def peak_tensor_mb(fn: Callable[[], object]) -> float:
    """MB of tensor storage the call allocated at its peak (what it returns counts while alive)."""
    mode = _PeakTensorMemory()
    with mode:
        result = fn()
    del result
    return mode.peak / 2**20
