"""Learned absolute position table resampled to each image's patch grid.

Qwen3-VL keeps SigLIP-2's learned square table (48 x 48 = 2304 entries) and resamples it
to every image's ``(h, w)`` patch grid with align-corners bilinear interpolation, laid out
in the processor's ``m x m`` merge-block order and repeated over the temporal patches
(arXiv 2511.21631 section 2; REFERENCE.md section 2). GLM-4.1V/4.5V resamples its 24 x 24
table bicubically with half-pixel centres and border padding (arXiv 2507.01006 section 2).

Both are vectorised over all images: one interpolation over the patches of every image's
first frame, then an index expansion over the temporal patches. Interpolation coordinates
and weights are computed in float32, as both reference implementations do, so results
agree with them bit for bit in any parameter dtype.

Notation: ``N`` patches, ``M`` patches of one frame per image, ``S`` table side, ``D`` width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vl_rope import vision_position_ids

__all__ = ["LearnedPositionTable", "bilinear_taps"]


def bilinear_taps(
    rows: torch.Tensor, cols: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor, side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Align-corners bilinear taps into a flattened ``side x side`` table.

    Target pixel ``i`` of an axis of length ``n`` samples source coordinate
    ``i * (side - 1) / (n - 1)`` (0 for ``n == 1``).

    Args:
        rows: ``[M]`` row of each patch.
        cols: ``[M]`` column of each patch.
        heights: ``[M]`` patch rows of the patch's image.
        widths: ``[M]`` patch columns of the patch's image.
        side: Table side ``S``.

    Returns:
        ``(index [M, 4] int64, weight [M, 4] float32)``.
    """

    def axis(pos: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        src = pos.float() * (side - 1) / torch.clamp(size - 1, min=1)
        lo = src.floor()
        frac = src - lo
        lo_i = lo.long().clamp(0, side - 1)
        hi_i = (lo.long() + 1).clamp(0, side - 1)
        # hat-kernel weights 1 - |distance| to the two taps (the second one kept in this form so the
        # float32 rounding equals the reference implementations')
        return torch.stack((lo_i, hi_i), -1), torch.stack((1 - frac.abs(), 1 - (frac - 1).abs()), -1)

    r_idx, r_w = axis(rows, heights)
    c_idx, c_w = axis(cols, widths)
    index = (r_idx[:, :, None] * side + c_idx[:, None, :]).flatten(1)
    weight = (r_w[:, :, None] * c_w[:, None, :]).flatten(1)
    return index, weight


class LearnedPositionTable(nn.Module):
    """Square learned position table, resampled per image (key ``weight [S*S, D]``).

    Args:
        num_positions: ``S * S`` entries.
        dim: Width ``D``.
        mode: ``"bilinear"`` (align corners, Qwen) or ``"bicubic"`` (half-pixel, border, GLM).
        spatial_merge_size: ``m``; output rows follow the merge-block order.
    """

    def __init__(self, num_positions: int, dim: int, *, mode: str = "bilinear", spatial_merge_size: int = 2) -> None:
        super().__init__()
        side = math.isqrt(num_positions)
        if side * side != num_positions:
            raise ValueError(f"num_positions = {num_positions} is not a square (side x side table)")
        if mode not in ("bilinear", "bicubic"):
            raise ValueError(f"mode must be 'bilinear' or 'bicubic', got {mode!r}")
        self.weight = nn.Parameter(torch.empty(num_positions, dim))
        nn.init.normal_(self.weight, std=0.02)
        self.side = side
        self.mode = mode
        self.spatial_merge_size = spatial_merge_size

    def _frames(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Resampled table for one frame of every image, ``[M, D]`` in merge-block order."""
        grid = grid_thw.to(self.weight.device)
        frame = torch.cat((torch.ones_like(grid[:, :1]), grid[:, 1:]), dim=1)
        rc = vision_position_ids(frame, self.spatial_merge_size)
        sizes = frame[:, 1] * frame[:, 2]
        heights = torch.repeat_interleave(frame[:, 1], sizes)
        widths = torch.repeat_interleave(frame[:, 2], sizes)
        table = self.weight
        if self.mode == "bilinear":
            index, weight = bilinear_taps(rc[:, 0], rc[:, 1], heights, widths, self.side)
            acc = torch.float64 if table.dtype == torch.float64 else torch.float32
            out = (F.embedding(index, table).to(acc) * weight.to(acc)[..., None]).sum(1)
            return out.to(table.dtype)
        # bicubic (Keys a = -0.75, torch's kernel), align_corners=False, border padding, in float32
        x = ((rc[:, 1] + 0.5) / widths.float()) * 2 - 1
        y = ((rc[:, 0] + 0.5) / heights.float()) * 2 - 1
        grid2d = torch.stack((x, y), -1)[None, :, None, :]
        image = table.view(self.side, self.side, -1).permute(2, 0, 1)[None].float()
        out = F.grid_sample(image, grid2d, mode="bicubic", align_corners=False, padding_mode="border")
        return out[0, :, :, 0].t().to(table.dtype)

    def forward(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Position embeddings ``[N, D]`` for all patches of ``grid_thw [n, 3]`` (frames repeated)."""
        per_frame = self._frames(grid_thw)
        t = grid_thw[:, 0].to(per_frame.device)
        if bool((t == 1).all()):
            return per_frame
        sizes = grid_thw[:, 1].to(per_frame.device) * grid_thw[:, 2].to(per_frame.device)
        starts = torch.cumsum(sizes, 0) - sizes
        # patch j of frame f of image i takes row starts[i] + j
        image = torch.repeat_interleave(torch.arange(len(sizes), device=t.device), t * sizes)
        first = torch.cumsum(t * sizes, 0) - t * sizes
        local = torch.arange(int((t * sizes).sum()), device=t.device) - first[image]
        return per_frame[starts[image] + local % sizes[image]]

    def extra_repr(self) -> str:
        return f"{self.side}x{self.side}, dim={self.weight.shape[1]}, mode={self.mode}"
