"""The block and tokens of the expert-parallel test (shared by the ranks and the one-process reference)."""

from __future__ import annotations

import torch

from vl_moe import SparseMoeBlock

HIDDEN, WIDTH, EXPERTS, TOP_K = 16, 8, 4, 2


def block() -> SparseMoeBlock:
    """A torch-backend block, the same weights on every rank."""
    torch.manual_seed(0)
    return SparseMoeBlock(HIDDEN, WIDTH, EXPERTS, TOP_K, backend="torch", init_std=0.5)


def one_sided() -> SparseMoeBlock:
    """A block whose router picks experts 0 and 1 for positive tokens: rank 1's experts get nothing."""
    moe = block()
    with torch.no_grad():
        moe.gate.weight[:2] = moe.gate.weight[:2].abs()
        moe.gate.weight[2:] = 0.0
    return moe


def tokens(rank: int, positive: bool = False) -> torch.Tensor:
    """Rank ``rank``'s tokens (5 and 3: ranks hold different counts)."""
    x = torch.randn(5 if rank == 0 else 3, HIDDEN, generator=torch.Generator().manual_seed(rank))
    return x.abs() if positive else x


def cotangent(y: torch.Tensor) -> torch.Tensor:
    """A fixed output gradient for ``y``."""
    return torch.linspace(-1.0, 1.0, y.numel()).view_as(y)
