"""The Triton token alignment (``vl_moe.kernels.align_tokens``) against a torch counting-sort reference.

Runs on CPU through Triton's interpreter (``TRITON_INTERPRET=1`` is set by ``tests/conftest.py``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vl_moe.kernels import Alignment, align_tokens

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Padded run boundaries ``[E+1]`` and, per expert, its pair indices in increasing order."""
    flat = topk_ids.reshape(-1).cpu().long()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)])
    pairs = torch.arange(flat.numel())
    return offsets, [pairs[flat == e] for e in range(num_experts)]


def _check(align: Alignment, topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    offsets, runs = _reference(topk_ids, num_experts, block_m)
    num_pairs = topk_ids.numel()
    sorted_ids, block_expert = align.sorted_ids.cpu(), align.block_expert.cpu()
    assert align.num_pairs == num_pairs and align.top_k == topk_ids.shape[1] and align.block_m == block_m
    assert sorted_ids.dtype == torch.int64 and align.expert_offsets.dtype == torch.int64
    assert torch.equal(align.expert_offsets.cpu(), offsets)
    assert sorted_ids.numel() == align.num_blocks * block_m >= int(offsets[-1])
    for e, run in enumerate(runs):
        start, end = int(offsets[e]), int(offsets[e + 1])
        assert torch.equal(sorted_ids[start : start + run.numel()], run), f"expert {e}: wrong pairs or order"
        assert (sorted_ids[start + run.numel() : end] == num_pairs).all(), f"expert {e}: padding rows not sentinel"
        assert (block_expert[start // block_m : end // block_m] == e).all()
    assert (sorted_ids[int(offsets[-1]) :] == num_pairs).all()
    assert (block_expert[int(offsets[-1]) // block_m :] == -1).all()


def _balanced(num_tokens: int, top_k: int, num_experts: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "block_m"),
    [
        (1, 2, 4, 16),
        (7, 2, 5, 16),
        (33, 2, 8, 16),
        (33, 1, 8, 32),
        (300, 3, 7, 16),
        (40, 8, 128, 16),
        (600, 8, 128, 64),
    ],
)
def test_align_matches_reference(num_tokens: int, top_k: int, num_experts: int, block_m: int) -> None:
    gen = torch.Generator().manual_seed(num_tokens * 131 + num_experts)
    ids = _balanced(num_tokens, top_k, num_experts, gen).to(DEVICE)
    _check(align_tokens(ids, num_experts, block_m), ids, num_experts, block_m)


@pytest.mark.parametrize(
    "case", ["zero_token_experts", "one_expert", "duplicate_slots", "last_expert_only", "int32_ids", "no_tokens"]
)
def test_align_routing_edge_cases(case: str) -> None:
    gen = torch.Generator().manual_seed(3)
    num_experts, block_m = 8, 16
    if case == "zero_token_experts":
        ids = torch.tensor([0, 5])[torch.randint(0, 2, (21, 2), generator=gen)]
    elif case == "one_expert":
        ids = torch.full((37, 1), 3)
    elif case == "duplicate_slots":
        ids = torch.randint(0, num_experts, (19, 4), generator=gen)
    elif case == "last_expert_only":
        ids = torch.full((5, 2), num_experts - 1)
    elif case == "int32_ids":
        ids = _balanced(13, 2, num_experts, gen).int()
    else:
        ids = torch.empty(0, 2, dtype=torch.long)
    ids = ids.to(DEVICE)
    _check(align_tokens(ids, num_experts, block_m), ids, num_experts, block_m)


def test_align_is_deterministic() -> None:
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 6, (50, 2), generator=gen).to(DEVICE)
    first, second = align_tokens(ids, 6, 16), align_tokens(ids, 6, 16)
    for name in ("sorted_ids", "block_expert", "expert_offsets"):
        assert torch.equal(getattr(first, name), getattr(second, name))


def test_align_above_70k_pairs_int64() -> None:
    """72,008 pairs (above 70K) skewed towards one expert: int64 offsets and multi-chunk prefix sums."""
    gen = torch.Generator().manual_seed(5)
    num_experts, block_m = 12, 16
    ids = torch.randint(0, num_experts, (36_004, 2), generator=gen)
    ids[::3, 0] = 7  # skew: one expert gets about a third of all pairs more
    ids = ids.to(DEVICE)
    _check(align_tokens(ids, num_experts, block_m), ids, num_experts, block_m)


@pytest.mark.parametrize(
    ("ids", "num_experts", "block_m", "match"),
    [
        (torch.tensor([[0, 4]]), 4, 16, r"expert id 4, outside \[0, 4\)"),
        (torch.tensor([[-1, 2]]), 4, 16, r"expert id -1, outside \[0, 4\)"),
        (torch.tensor([0, 1]), 4, 16, r"2-D \[T, k\], got 1-D"),
        (torch.tensor([[0.0, 1.0]]), 4, 16, "integer tensor, got dtype torch.float32"),
        (torch.tensor([[0, 1]]), 0, 16, "num_experts must be >= 1, got 0"),
        (torch.tensor([[0, 1]]), 4, 24, "power of two, got 24"),
    ],
)
def test_align_bad_input(ids: torch.Tensor, num_experts: int, block_m: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        align_tokens(ids.to(DEVICE), num_experts, block_m)
