"""Patch embedding of the vision tower as one matmul over flattened patches.

The reference implementations run an ``nn.Conv3d`` whose kernel equals its stride
``(T, P, P)`` (Qwen2-VL arXiv 2409.12191 section 2.1; Qwen3-VL arXiv 2511.21631 section 2).
On pre-cut patches that convolution is a plain linear map of each ``C*T*P*P`` row, so we
compute ``pixel_values @ W.view(D, -1).T + b`` (no 5-D reshape, no conv dispatch). The
parameters keep the conv layout and key, ``proj.weight [D, C, T, P, P]`` and ``proj.bias [D]``.

Notation: ``N`` patches, ``C`` channels, ``T`` temporal patch, ``P`` patch side, ``D`` width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PatchEmbed"]


class PatchEmbed(nn.Module):
    """``[N, C*T*P*P] -> [N, D]`` with conv-layout weights.

    Args:
        in_channels: ``C``.
        hidden_size: ``D``.
        patch_size: ``P``.
        temporal_patch_size: ``T``.
        bias: Conv bias (``proj.bias``).
    """

    def __init__(
        self, in_channels: int, hidden_size: int, patch_size: int, temporal_patch_size: int, bias: bool = True
    ) -> None:
        super().__init__()
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=kernel, stride=kernel, bias=bias)
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size

    @property
    def patch_dim(self) -> int:
        """``C * T * P * P``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Embed pre-cut patches ``[N, C*T*P*P]`` (cast to the weight dtype) to ``[N, D]``."""
        if pixel_values.dim() != 2 or pixel_values.shape[1] != self.patch_dim:
            raise ValueError(
                f"pixel_values must be [N, C*T*P*P] = [N, {self.patch_dim}] "
                f"(C={self.in_channels}, T={self.temporal_patch_size}, P={self.patch_size}), "
                f"got shape {tuple(pixel_values.shape)}"
            )
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.view(self.hidden_size, -1), self.proj.bias)
