"""Validation of the tower's inputs: ``pixel_values [N, C*T*P*P]`` against ``grid_thw [n, 3]``.

Every error is a ``ValueError`` that names the problem and both numbers involved.
"""

from __future__ import annotations

import torch

__all__ = ["check_inputs"]


def check_grid(grid_thw: torch.Tensor, spatial_merge_size: int) -> torch.Tensor:
    """Check a ``[n, 3]`` integer grid of positive ``(t, h, w)`` with ``h, w`` divisible by ``m``; int64."""
    if not isinstance(grid_thw, torch.Tensor):
        grid_thw = torch.as_tensor(grid_thw)
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(f"grid_thw must have shape [n, 3] (t, h, w), got {tuple(grid_thw.shape)}")
    if grid_thw.is_floating_point() or grid_thw.is_complex() or grid_thw.dtype == torch.bool:
        raise ValueError(f"grid_thw must hold integers, got dtype {grid_thw.dtype}")
    grid = grid_thw.long()
    for i, (t, h, w) in enumerate(grid.tolist()):
        for name, value in (("t", t), ("h", h), ("w", w)):
            if value <= 0:
                raise ValueError(f"grid_thw[{i}] = {[t, h, w]}: {name} = {value} must be positive (> 0)")
        m = spatial_merge_size
        if h % m or w % m:
            raise ValueError(
                f"grid_thw[{i}] = {[t, h, w]}: h = {h} and w = {w} must both be divisible by spatial_merge_size = {m}"
            )
    return grid


def check_inputs(
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    *,
    in_channels: int,
    temporal_patch_size: int,
    patch_size: int,
    spatial_merge_size: int,
) -> torch.Tensor:
    """Check the tower's inputs; return ``grid_thw`` as int64.

    Raises:
        ValueError: ``pixel_values`` not 2-D, a row width other than ``C*T*P*P`` (the message
            also says how many channels the width implies), a bad grid, or a grid whose patch
            count differs from the number of rows.
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 2:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a 2-D tensor [N, C*T*P*P] of patches, got {shape}")
    per_channel = temporal_patch_size * patch_size * patch_size
    width = in_channels * per_channel
    if pixel_values.shape[1] != width:
        hint = ""
        if pixel_values.shape[1] % per_channel == 0:
            hint = f" (it implies {pixel_values.shape[1] // per_channel} channels, the config has in_channels = {in_channels})"
        raise ValueError(
            f"pixel_values rows have width {pixel_values.shape[1]} but C*T*P*P = {in_channels}*{temporal_patch_size}*"
            f"{patch_size}*{patch_size} = {width}{hint}"
        )
    grid = check_grid(grid_thw, spatial_merge_size)
    patches = int(grid.prod(-1).sum()) if grid.numel() else 0
    if patches != pixel_values.shape[0]:
        raise ValueError(
            f"grid_thw describes {patches} patches (sum of t*h*w) but pixel_values has {pixel_values.shape[0]} rows"
        )
    return grid
