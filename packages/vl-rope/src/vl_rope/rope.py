"""1-D rotary position embedding (RoFormer, arXiv 2104.09864) with context-extension scalings.

``RoPE`` turns integer positions into the cos/sin tables that ``apply_rotary``
consumes, in the NeoX layout ``cat(f, f)``. Frequencies come from
``vl_rope.scaling`` (default, linear, dynamic NTK, YaRN).

Notation: ``B`` batch, ``L`` sequence, ``D`` head dim, ``R`` rotary dims.
"""

from __future__ import annotations

import torch
from torch import nn

from .scaling import RopeScaling, rope_frequencies

__all__ = ["RoPE", "rotary_dim"]


def rotary_dim(head_dim: int, partial_rotary_factor: float = 1.0) -> int:
    """Rotary dims for a head: ``int(head_dim * partial_rotary_factor)``, checked to be positive and even."""
    if not 0 < partial_rotary_factor <= 1:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {partial_rotary_factor}")
    dim = int(head_dim * partial_rotary_factor)
    if dim <= 0 or dim % 2:
        raise ValueError(
            f"head_dim {head_dim} x partial_rotary_factor {partial_rotary_factor} = {dim} rotary dims; must be even"
        )
    return dim


class _Rotary(nn.Module):
    """Shared state of the text rotary modules: frequencies, attention factor, dynamic recomputation."""

    inv_freq: torch.Tensor

    def __init__(self, dim: int, theta: float, scaling: RopeScaling | None) -> None:
        super().__init__()
        if theta <= 0:
            raise ValueError(f"rope theta must be positive, got {theta}")
        self.dim = dim
        self.theta = float(theta)
        self.scaling = scaling or RopeScaling()
        inv_freq, self.attention_factor = rope_frequencies(dim, self.theta, self.scaling)
        # not persistent: derived from the config, so checkpoints never carry (and never disagree on) it
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        """``inv_freq`` for this call; dynamic NTK recomputes it from the longest position seen."""
        if self.scaling.rope_type != "dynamic":
            return self.inv_freq
        seq_len = int(position_ids.max().item()) + 1 if position_ids.numel() else 0
        inv_freq, _ = rope_frequencies(self.dim, self.theta, self.scaling, seq_len=seq_len)
        return inv_freq.to(self.inv_freq.device)

    def _cos_sin(self, freqs: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        if dtype is not None:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta:g}, scaling={self.scaling.rope_type}"


class RoPE(_Rotary):
    """1-D rotary embedding.

    Args:
        head_dim: Attention head dim ``D``.
        theta: Frequency base (``rope_theta``).
        scaling: Context-extension scaling (``RopeScaling``); None for the plain frequencies.
        partial_rotary_factor: Share of ``D`` that rotates (``R = int(D * factor)``).

    Example:
        >>> rope = RoPE(64, theta=1e6)
        >>> cos, sin = rope(torch.arange(10)[None])
        >>> cos.shape
        torch.Size([1, 10, 64])
    """

    def __init__(
        self,
        head_dim: int,
        theta: float = 10000.0,
        scaling: RopeScaling | None = None,
        *,
        partial_rotary_factor: float = 1.0,
    ) -> None:
        super().__init__(rotary_dim(head_dim, partial_rotary_factor), theta, scaling)
        self.head_dim = head_dim

    @torch.no_grad()
    def forward(
        self, position_ids: torch.Tensor, *, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[B, L, R]`` for integer positions ``[B, L]`` (float32 unless ``dtype`` is given)."""
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [B, L], got shape {tuple(position_ids.shape)}")
        inv_freq = self.frequencies(position_ids)
        freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return self._cos_sin(emb, dtype)
