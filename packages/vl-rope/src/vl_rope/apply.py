"""Applying rotary embeddings to queries and keys (pure torch).

Implements the rotation of RoFormer (arXiv 2104.09864, section 3.4) in the two
memory layouts used by the Qwen3-VL family:

- ``"neox"`` (rotate-half): the first and second halves of the rotary dims form
  the pairs; cos/sin are laid out as ``cat(f, f)``. Used by Qwen2/2.5/3-VL text
  and vision towers.
- ``"gptj"`` (adjacent pairs): dims ``(2i, 2i+1)`` form the pairs; cos/sin are
  laid out as ``f.repeat_interleave(2)``. Used by GLM-4.5V's 3D-RoPE.

When ``cos.shape[-1]`` is smaller than the head dim, only the leading
``cos.shape[-1]`` dims rotate and the rest pass through (partial rotary).

Notation: ``B`` batch, ``H`` heads, ``L`` sequence, ``D`` head dim, ``R`` rotary dims (<= D).
"""

from __future__ import annotations

from typing import Literal

import torch

RotaryStyle = Literal["neox", "gptj"]

__all__ = ["RotaryStyle", "apply_rotary", "rotate_half", "rotate_pairs"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (NeoX layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)`` over the last dim (GPT-J layout)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> int:
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    rot = cos.shape[-1]
    for name, t in (("q", q), ("k", k)):
        if t.shape[-1] < rot:
            raise ValueError(
                f"{name} has head dim {t.shape[-1]} but cos/sin have {rot} rotary dims (must be <= head dim)"
            )
    if rot % 2:
        raise ValueError(f"the rotary dim must be even, got {rot}")
    return rot


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    style: RotaryStyle = "neox",
    unsqueeze_dim: int = 1,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by the angles whose cos/sin are given.

    Args:
        q: Queries, e.g. ``[B, Hq, L, D]`` (or ``[N, Hq, D]`` for packed vision tokens).
        k: Keys with the same layout as ``q``; the head count may differ (GQA).
        cos: Cosines ``[B, L, R]`` (or ``[N, R]``), broadcast over heads by
            inserting a dim at ``unsqueeze_dim``.
        sin: Sines, same shape as ``cos``.
        style: ``"neox"`` (rotate-half, Qwen) or ``"gptj"`` (adjacent pairs, GLM).
        unsqueeze_dim: Where the head dim sits in ``q``/``k`` relative to ``cos``;
            ``1`` for ``[B, H, L, D]`` with ``[B, L, R]`` and for ``[N, H, D]`` with
            ``[N, R]``; ``2`` for ``[B, L, H, D]``.
        upcast: Compute in float32 and cast back (what the Qwen3-VL vision tower
            does); otherwise compute in the inputs' dtype (what its text model does).

    Returns:
        The rotated ``(q, k)``, in the dtypes of the inputs.
    """
    if style not in ("neox", "gptj"):
        raise ValueError(f"style must be 'neox' or 'gptj', got {style!r}")
    rot = _check_shapes(q, k, cos, sin)
    rotate = rotate_half if style == "neox" else rotate_pairs
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)

    def one(x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        if upcast:
            x_rot = x_rot.float()
            c, s = cos.float(), sin.float()
        else:
            c, s = cos.to(dtype), sin.to(dtype)
        out = (x_rot * c + rotate(x_rot) * s).to(dtype)
        return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)

    return one(q), one(k)
