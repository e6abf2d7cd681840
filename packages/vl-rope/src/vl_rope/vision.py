"""2-D axial rotary embedding of the Qwen2/2.5/3-VL and GLM-4.5V vision towers.

Half of the rotary frequencies rotate with a patch's row, half with its column
(REFERENCE.md section 2). Patches arrive in the processor's 2x2 merge-block
order (the four patches of a merge block are consecutive rows), so positions
are laid out in that order too, and repeated for every temporal patch.

Notation: ``N`` patches over all images, ``D`` head dim, ``m`` spatial merge size.
"""

from __future__ import annotations

import torch
from torch import nn

from ._grids import check_grid_thw
from .scaling import default_inv_freq

__all__ = ["VisionRoPE2D", "vision_position_ids"]


def vision_position_ids(grid_thw: torch.Tensor, spatial_merge_size: int = 2) -> torch.Tensor:
    """(row, column) of every patch, ``[N, 2]`` int64, in merge-block order.

    Within a frame the order is: merge blocks row-major over the ``(h/m, w/m)``
    block grid, and inside a block the ``m x m`` patches row-major. Each image's
    frame is repeated ``t`` times. Vectorised over all images (no per-image loop).

    Args:
        grid_thw: ``[n, 3]`` patch grids (t, h, w) of the images/videos, in order.
        spatial_merge_size: ``m``; h and w must be divisible by it.
    """
    m = spatial_merge_size
    grid = check_grid_thw(grid_thw, "grid_thw", m)
    if grid.numel() == 0:
        return torch.zeros(0, 2, dtype=torch.long, device=grid.device)
    t, h, w = grid.unbind(-1)
    frame = h * w
    lengths = t * frame
    image = torch.repeat_interleave(torch.arange(len(grid), device=grid.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    local = torch.arange(int(lengths.sum()), device=grid.device) - starts[image]
    in_frame = local % frame[image]
    block, inside = in_frame // (m * m), in_frame % (m * m)
    blocks_per_row = w[image] // m
    row = (block // blocks_per_row) * m + inside // m
    col = (block % blocks_per_row) * m + inside % m
    return torch.stack((row, col), dim=-1)


class VisionRoPE2D(nn.Module):
    """Axial 2-D rotary embedding for a ViT at native resolution.

    The first ``D/4`` frequencies rotate with the row, the next ``D/4`` with the
    column; the ``D/2`` angles are duplicated to ``D`` (NeoX layout), so the whole
    head dim rotates. Apply with ``apply_rotary(q, k, cos, sin, upcast=True)`` on
    ``[N, H, D]`` queries/keys.

    Args:
        head_dim: Vision attention head dim ``D`` (divisible by 4).
        theta: Frequency base (10000 in Qwen-VL and GLM-4.5V towers).
        spatial_merge_size: ``m`` of the patch merger (2).

    Example:
        >>> rope = VisionRoPE2D(64)
        >>> cos, sin = rope(torch.tensor([[1, 4, 6], [2, 2, 2]]))
        >>> cos.shape
        torch.Size([32, 64])
    """

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float = 10000.0, spatial_merge_size: int = 2) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"the vision head_dim must be divisible by 4 (two axes x cos/sin pairs), got {head_dim}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self.spatial_merge_size = spatial_merge_size
        self.register_buffer("inv_freq", default_inv_freq(head_dim // 2, self.theta), persistent=False)

    @torch.no_grad()
    def forward(self, grid_thw: torch.Tensor, *, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[N, D]`` for all patches of the given grids (float32 unless ``dtype``)."""
        positions = vision_position_ids(grid_thw.to(self.inv_freq.device), self.spatial_merge_size)
        return self.from_positions(positions, dtype=dtype)

    def from_positions(
        self, positions: torch.Tensor, *, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[N, D]`` for explicit (row, column) positions ``[N, 2]``."""
        if positions.dim() != 2 or positions.shape[-1] != 2:
            raise ValueError(f"positions must be [N, 2] (row, column), got shape {tuple(positions.shape)}")
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)  # [N, 2, D/4]
        half = freqs.flatten(1)  # rows' frequencies, then columns'
        emb = torch.cat((half, half), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if dtype is not None:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta:g}, spatial_merge_size={self.spatial_merge_size}"
