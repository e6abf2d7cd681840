"""Validation of ``grid_thw`` tensors shared by the vision and multimodal position code."""

from __future__ import annotations

import torch


def check_grid_thw(grid_thw: torch.Tensor, name: str, spatial_merge_size: int) -> torch.Tensor:
    """Check a ``[n, 3]`` integer grid of (t, h, w) patch counts; return it as int64.

    Raises:
        ValueError: wrong shape or dtype, a non-positive size, or h/w not divisible by the merge size;
            the message names the entry and both numbers.
    """
    if not isinstance(grid_thw, torch.Tensor):
        grid_thw = torch.as_tensor(grid_thw)
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(f"{name} must have shape [n, 3] (t, h, w), got {tuple(grid_thw.shape)}")
    if grid_thw.is_floating_point() or grid_thw.is_complex() or grid_thw.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {grid_thw.dtype}")
    if spatial_merge_size < 1:
        raise ValueError(f"spatial_merge_size must be >= 1, got {spatial_merge_size}")
    grid = grid_thw.long()
    if grid.numel() == 0:
        return grid
    bad = (grid <= 0).any(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}[{i}] = {grid[i].tolist()}: every grid size (t, h, w) must be positive")
    if spatial_merge_size > 1:
        odd = (grid[:, 1:] % spatial_merge_size != 0).any(dim=1)
        if bool(odd.any()):
            i = int(odd.nonzero()[0])
            t, h, w = grid[i].tolist()
            raise ValueError(
                f"{name}[{i}] = {[t, h, w]}: h = {h} and w = {w} must both be divisible by "
                f"spatial_merge_size = {spatial_merge_size}"
            )
    return grid
