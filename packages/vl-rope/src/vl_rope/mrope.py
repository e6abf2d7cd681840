"""Multimodal rotary embeddings: Qwen2/2.5-VL chunked MRoPE, Qwen3-VL interleaved MRoPE, GLM-4.5V 3D-RoPE.

Each rotary frequency belongs to one of three position axes (T, H, W). The
layouts differ only in which frequency goes to which axis
(REFERENCE.md section 1; Qwen3-VL report arXiv 2511.21631, section 2.2):

- chunked (Qwen2-VL, ``[16, 24, 24]``): contiguous blocks, so T owns the highest
  frequencies and W only the lowest;
- interleaved (Qwen3-VL, ``[24, 20, 20]``): ``THW`` repeated, then the leftover
  frequencies go to T, so every axis spans the whole spectrum;
- GLM-4.5V (``[8, 12, 12]``): chunked sections over a partial rotary dim, in the
  GPT-J adjacent-pair layout.

All take position ids ``[3, B, L]`` (a ``[B, L]`` input means text: the same
position on every axis) and return cos/sin ``[B, L, R]``.

Notation: ``B`` batch, ``L`` sequence, ``D`` head dim, ``R`` rotary dims, ``F = R/2`` frequencies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .rope import _Rotary, rotary_dim
from .scaling import RopeScaling

__all__ = ["GLM3DRoPE", "MRoPE", "mrope_axis_of_frequency"]

AXIS_NAMES = ("T", "H", "W")


def mrope_axis_of_frequency(mrope_section: Sequence[int], interleaved: bool) -> torch.Tensor:
    """The position axis (0 = T, 1 = H, 2 = W) that drives each rotary frequency.

    Args:
        mrope_section: Frequencies per axis ``(t, h, w)``; they sum to ``F``.
        interleaved: Qwen3-VL's interleaved layout (frequency ``i`` is H when ``i % 3 == 1``
            and ``i < 3h``, W when ``i % 3 == 2`` and ``i < 3w``, T otherwise) instead of
            contiguous chunks.

    Returns:
        ``[F]`` int64.
    """
    if len(mrope_section) != 3 or any(int(s) < 0 for s in mrope_section):
        raise ValueError(f"mrope_section must be three non-negative sizes (t, h, w), got {list(mrope_section)}")
    t, h, w = (int(s) for s in mrope_section)
    total = t + h + w
    if not interleaved:
        return torch.repeat_interleave(torch.arange(3), torch.tensor([t, h, w]))
    idx = torch.arange(total)
    axis = torch.zeros(total, dtype=torch.int64)
    axis[(idx % 3 == 1) & (idx < 3 * h)] = 1
    axis[(idx % 3 == 2) & (idx < 3 * w)] = 2
    counts = torch.bincount(axis, minlength=3).tolist()
    if counts != [t, h, w]:
        raise ValueError(
            f"interleaved mrope_section {[t, h, w]} cannot be laid out over {total} frequencies "
            f"(got T/H/W counts {counts}); the h and w sections must fit in the interleaved prefix"
        )
    return axis


def _as_3d(position_ids: torch.Tensor) -> torch.Tensor:
    if position_ids.dim() == 2:
        return position_ids.unsqueeze(0).expand(3, -1, -1)
    if position_ids.dim() != 3 or position_ids.shape[0] != 3:
        raise ValueError(f"position_ids must be [3, B, L] (or [B, L] for text), got shape {tuple(position_ids.shape)}")
    return position_ids


class _SectionedRotary(_Rotary):
    axis: torch.Tensor

    def __init__(
        self, dim: int, theta: float, mrope_section: Sequence[int], interleaved: bool, scaling: RopeScaling | None
    ):
        super().__init__(dim, theta, scaling)
        if sum(mrope_section) != dim // 2:
            raise ValueError(
                f"mrope_section {list(mrope_section)} sums to {sum(mrope_section)} but the rotary dim {dim} "
                f"has {dim // 2} frequencies"
            )
        self.mrope_section = [int(s) for s in mrope_section]
        self.interleaved = interleaved
        self.register_buffer("axis", mrope_axis_of_frequency(mrope_section, interleaved), persistent=False)

    def angles(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Rotation angles ``[B, L, F]``: each frequency times the position on its own axis."""
        position_ids = _as_3d(position_ids)
        inv_freq = self.frequencies(position_ids).to(position_ids.device)
        # pick each frequency's axis before multiplying: a third of the work of computing all three axes
        per_freq = position_ids.permute(1, 2, 0)[..., self.axis.to(position_ids.device)]
        return per_freq.float() * inv_freq


class MRoPE(_SectionedRotary):
    """Multimodal rotary embedding of Qwen2-VL (chunked) and Qwen3-VL (interleaved).

    Args:
        head_dim: Attention head dim ``D`` (128 for Qwen3-VL).
        theta: Frequency base (5e6 for Qwen3-VL, 1e6 for Qwen2-VL).
        mrope_section: Frequencies per axis ``(t, h, w)``; ``[24, 20, 20]`` for Qwen3-VL,
            ``[16, 24, 24]`` for Qwen2/2.5-VL. Must sum to ``D / 2``.
        interleaved: Qwen3-VL's interleaved layout; False gives Qwen2-VL's contiguous chunks.
        scaling: Context extension (e.g. ``RopeScaling(rope_type="yarn", factor=4.0,
            original_max_position_embeddings=262144)`` for 256K -> 1M).

    Example:
        >>> mrope = MRoPE(128, 5e6, [24, 20, 20])
        >>> cos, sin = mrope(torch.zeros(3, 2, 16, dtype=torch.long))
        >>> cos.shape
        torch.Size([2, 16, 128])
    """

    def __init__(
        self,
        head_dim: int,
        theta: float = 5_000_000.0,
        mrope_section: Sequence[int] = (24, 20, 20),
        interleaved: bool = True,
        scaling: RopeScaling | None = None,
    ) -> None:
        super().__init__(head_dim, theta, mrope_section, interleaved, scaling)
        self.head_dim = head_dim

    @torch.no_grad()
    def forward(
        self, position_ids: torch.Tensor, *, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[B, L, D]`` (NeoX layout) for positions ``[3, B, L]`` or ``[B, L]``."""
        freqs = self.angles(position_ids)
        return self._cos_sin(torch.cat((freqs, freqs), dim=-1), dtype)

    def extra_repr(self) -> str:
        layout = "interleaved" if self.interleaved else "chunked"
        return f"{super().extra_repr()}, mrope_section={self.mrope_section}, {layout}"


class GLM3DRoPE(_SectionedRotary):
    """GLM-4.1V/4.5V 3D rotary embedding: chunked sections, GPT-J pairs, partial rotary.

    Apply with ``apply_rotary(q, k, cos, sin, style="gptj")``: only the first
    ``R = D * partial_rotary_factor`` dims rotate.

    Args:
        head_dim: Attention head dim ``D``.
        theta: Frequency base.
        mrope_section: Frequencies per axis over the rotary dims (``[8, 12, 12]`` for
            ``D = 128``, factor 0.5); must sum to ``R / 2``.
        partial_rotary_factor: Share of ``D`` that rotates.
        scaling: Context extension.
    """

    def __init__(
        self,
        head_dim: int,
        theta: float = 10000.0,
        mrope_section: Sequence[int] = (8, 12, 12),
        partial_rotary_factor: float = 0.5,
        scaling: RopeScaling | None = None,
    ) -> None:
        super().__init__(rotary_dim(head_dim, partial_rotary_factor), theta, mrope_section, False, scaling)
        self.head_dim = head_dim

    @torch.no_grad()
    def forward(
        self, position_ids: torch.Tensor, *, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[B, L, R]`` (GPT-J layout) for positions ``[3, B, L]`` or ``[B, L]``."""
        freqs = self.angles(position_ids)
        return self._cos_sin(freqs.repeat_interleave(2, dim=-1), dtype)
