"""Pre-norm transformer block of the vision tower, assembled from its parts.

``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` (ViT, arXiv 2010.11929 section 3.1; the
Qwen3-VL tower, arXiv 2511.21631 section 2). The block takes its norm, attention and MLP
as arguments (composition), so the Qwen (LayerNorm + GELU MLP) and GLM (RMSNorm + SwiGLU)
variants are the same class. Keys: ``norm1.*``, ``attn.qkv.*``, ``attn.proj.*``, ``norm2.*``,
``mlp.*``.

Notation: ``N`` packed tokens, ``D`` width, ``Dh`` head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import VarlenLayout, VisionAttention

__all__ = ["VisionBlock"]


class VisionBlock(nn.Module):
    """One pre-norm block.

    Args:
        norm1: Norm before attention.
        attn: The attention (``VisionAttention``).
        norm2: Norm before the MLP.
        mlp: The MLP (``[N, D] -> [N, D]``).
        chunk_rows: On CPU, run norm2 + MLP over row chunks of this size (a speed and peak-memory
            choice with identical results); ``None`` processes all rows at once.
    """

    def __init__(
        self,
        norm1: nn.Module,
        attn: VisionAttention,
        norm2: nn.Module,
        mlp: nn.Module,
        *,
        chunk_rows: int | None = 2048,
    ) -> None:
        super().__init__()
        self.norm1 = norm1
        self.attn = attn
        self.norm2 = norm2
        self.mlp = mlp
        self.chunk_rows = chunk_rows

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, layout: VarlenLayout
    ) -> torch.Tensor:
        """``[N, D] -> [N, D]``; ``rope`` is ``(cos, sin)`` ``[N, Dh]``, ``layout`` the attention segments."""
        x = x + self.attn(self.norm1(x), rope, layout)
        rows = self.chunk_rows
        if rows is None or x.device.type != "cpu" or x.shape[0] <= rows:
            return x + self.mlp(self.norm2(x))
        # On CPU, the MLP in row chunks: the [rows, 4D] intermediate stays small enough for the heap
        # allocator (a fresh [N, 4D] buffer costs page faults on every call) and peak memory drops.
        if not torch.is_grad_enabled():
            out = torch.empty_like(x)
            for xc, oc in zip(x.split(rows), out.split(rows), strict=True):
                torch.add(xc, self.mlp(self.norm2(xc)), out=oc)
            return out
        return torch.cat([xc + self.mlp(self.norm2(xc)) for xc in x.split(rows)])
