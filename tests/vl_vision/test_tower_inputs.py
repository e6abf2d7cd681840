"""Bad tower inputs raise ValueError naming the problem and both numbers."""

from __future__ import annotations

import pytest
import torch
from _tower_helpers import random_pixels, tiny_config

from vl_vision import VisionTransformer


@pytest.fixture(scope="module")
def tower() -> VisionTransformer:
    return VisionTransformer(tiny_config(depth=1, deepstack_visual_indexes=[0])).double().eval()


def test_patch_count_mismatch(tower: VisionTransformer) -> None:
    grid = torch.tensor([[1, 4, 6], [2, 2, 2]])  # 24 + 8 = 32 patches
    x = random_pixels(tower.config, grid)[:-3]
    with pytest.raises(
        ValueError, match=r"grid_thw describes 32 patches \(sum of t\*h\*w\) but pixel_values has 29 rows"
    ):
        tower(x, grid)


def test_wrong_row_width(tower: VisionTransformer) -> None:
    grid = torch.tensor([[1, 2, 2]])
    with pytest.raises(ValueError, match=r"rows have width 90 but C\*T\*P\*P = 3\*2\*4\*4 = 96"):
        tower(torch.randn(4, 90, dtype=torch.float64), grid)


def test_wrong_channel_count(tower: VisionTransformer) -> None:
    grid = torch.tensor([[1, 2, 2]])
    with pytest.raises(
        ValueError,
        match=r"width 32 but C\*T\*P\*P = 3\*2\*4\*4 = 96 \(it implies 1 channels, the config has in_channels = 3\)",
    ):
        tower(torch.randn(4, 32, dtype=torch.float64), grid)


def test_not_2d(tower: VisionTransformer) -> None:
    with pytest.raises(ValueError, match=r"2-D tensor \[N, C\*T\*P\*P\].*\(1, 4, 96\)"):
        tower(torch.randn(1, 4, 96, dtype=torch.float64), torch.tensor([[1, 2, 2]]))


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ([[1, 3, 4]], r"grid_thw\[0\] = \[1, 3, 4\]: h = 3 and w = 4 must both be divisible by spatial_merge_size = 2"),
        ([[1, 2, 2], [1, 4, 5]], r"grid_thw\[1\] = \[1, 4, 5\]: h = 4 and w = 5 must both be divisible"),
        ([[0, 2, 2]], r"grid_thw\[0\] = \[0, 2, 2\]: t = 0 must be positive"),
        ([[1, -2, 2]], r"grid_thw\[0\] = \[1, -2, 2\]: h = -2 must be positive"),
        ([[1, 2, 0]], r"grid_thw\[0\] = \[1, 2, 0\]: w = 0 must be positive"),
    ],
)
def test_bad_grids(tower: VisionTransformer, grid: list[list[int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tower(torch.randn(4, 96, dtype=torch.float64), torch.tensor(grid))


def test_grid_shape_and_dtype(tower: VisionTransformer) -> None:
    with pytest.raises(ValueError, match=r"shape \[n, 3\].*\(2,\)"):
        tower(torch.randn(4, 96, dtype=torch.float64), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match=r"must hold integers, got dtype torch\.float32"):
        tower(torch.randn(4, 96, dtype=torch.float64), torch.tensor([[1.0, 2.0, 2.0]]))
