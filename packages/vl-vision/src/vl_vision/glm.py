"""The GLM-4.1V/4.5V parts of the vision tower (arXiv 2507.01006 section 2).

GLM's tower differs from Qwen3-VL's in a few parts, each a small module here:
RMSNorm after the patch embedding (``post_conv_layernorm``), a bicubic 24 x 24 position
table (see ``position.py``), RMSNorm + SwiGLU blocks without attention-output bias, and a
merge head: RMSNorm (``post_layernorm``) -> the ``m x m`` block through a stride-``m`` conv
(``downsample``, computed as one matmul) -> ``GLMMerger`` (projection, LayerNorm, GELU,
SwiGLU). Key names follow GLM's checkpoints.

Notation: ``N`` patches, ``D`` ViT width, ``m`` merge size, ``E`` output width, ``I`` SwiGLU width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import activation

__all__ = ["GLMMerger", "MergeDownsample"]


class MergeDownsample(nn.Module):
    """Stride-``m`` ``m x m`` conv over each merge block, as a matmul: ``[N, D] -> [N / m^2, E]``.

    Keys: ``weight [E, D, m, m]``, ``bias [E]`` (``nn.Conv2d`` layout).
    """

    def __init__(self, dim: int, out_dim: int, spatial_merge_size: int = 2) -> None:
        super().__init__()
        m = spatial_merge_size
        conv = nn.Conv2d(dim, out_dim, kernel_size=m, stride=m)  # for its default init
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        self.unit = m * m
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` patches in merge-block order -> ``[N / m^2, E]``."""
        if x.shape[0] % self.unit:
            raise ValueError(f"the downsample needs a multiple of {self.unit} patches, got {x.shape[0]}")
        blocks = x.reshape(-1, self.unit, self.dim).transpose(1, 2).reshape(-1, self.dim * self.unit)
        return F.linear(blocks, self.weight.reshape(self.weight.shape[0], -1), self.bias)


class GLMMerger(nn.Module):
    """``down(act(gate(h)) * up(h))`` with ``h = gelu(LayerNorm(proj(x)))``: ``[M, E] -> [M, E]``.

    Keys: ``proj``, ``post_projection_norm``, ``gate_proj``, ``up_proj``, ``down_proj``.

    Args:
        dim: Width ``E``.
        hidden: SwiGLU width ``I``.
        act: Gate activation name.
        bias: Biases of the linears.
    """

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act1 = nn.GELU()
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, E] -> [M, E]``."""
        h = self.act1(self.post_projection_norm(self.proj(x)))
        return self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))
