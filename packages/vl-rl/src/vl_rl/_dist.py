"""Agreement between ranks for the RL trainer and the rollout engines (no-ops for one process).

A model sharded with FSDP2 runs a collective in every forward and backward, so every rank must make
the same number of them even when its own data needs fewer (fewer forced answers, fewer rows).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["agreed", "distributed"]


def distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agreed(value: float, op: Callable[..., Any] = max) -> Any:
    """``op`` (``max`` or ``sum``) of ``value`` over all ranks; ``value`` itself for one process.

    An ``int`` comes back as an ``int``.
    """
    if not distributed():
        return value
    out = torch.tensor([float(value)], dtype=torch.float64)
    reduce = torch.distributed.ReduceOp.MAX if op is max else torch.distributed.ReduceOp.SUM
    torch.distributed.all_reduce(out, op=reduce)
    result = float(out.item())
    return int(result) if isinstance(value, int) else result
