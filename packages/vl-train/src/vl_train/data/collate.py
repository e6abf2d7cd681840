"""Pad-to-longest collation of rendered samples into an unpacked batch (left or right padding).

The unpacked counterpart of :mod:`vl_train.data.packing` (one sample per row), producing the same
keys so that a trainer can switch between the two. Visual inputs are concatenated in sample order,
which is the order the model's placeholder scatter reads them (row-major over the batch).

Notation: ``B`` rows (samples); ``L`` padded length; ``N`` patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .render import IGNORE_INDEX, RenderedSample

__all__ = ["PIXEL_KEYS", "collate", "concat_visuals"]

PIXEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
"""Visual input keys; each is present in a batch only when some sample has it."""


def concat_visuals(samples: Sequence[RenderedSample]) -> dict[str, torch.Tensor]:
    """Concatenate the samples' ``pixel_values`` / grids (images and videos apart) in the given order."""
    out: dict[str, torch.Tensor] = {}
    for key in PIXEL_KEYS:
        parts = [t for t in (getattr(s, key) for s in samples) if t is not None]
        if parts:
            out[key] = torch.cat(parts, dim=0)
    return out


def collate(
    samples: Sequence[RenderedSample],
    *,
    pad_token_id: int,
    padding_side: Literal["left", "right"] = "right",
    pad_to_multiple_of: int | None = None,
    with_segment_ids: bool = True,
) -> dict[str, torch.Tensor]:
    """Pad samples to the longest one and stack them.

    Args:
        samples: Rendered samples (at least one).
        pad_token_id: Token id written at padding positions.
        padding_side: Pad on the ``"right"`` (training) or the ``"left"`` (generation).
        pad_to_multiple_of: Round the padded length up to a multiple of this.
        with_segment_ids: Also return ``segment_ids`` (0 on tokens, -1 on padding), as packed batches do.

    Returns:
        ``input_ids``, ``labels`` (``-100`` on padding), ``attention_mask``, ``mm_token_type_ids``
        (each ``[B, L]``), ``segment_ids`` ``[B, L]`` (optional) and the concatenated visual inputs.

    Raises:
        ValueError: No samples, an unknown ``padding_side`` or ``pad_to_multiple_of < 1``.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    width = max(len(s) for s in samples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(samples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    types = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample)
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, cols] = sample.input_ids
        labels[row, cols] = sample.labels
        types[row, cols] = sample.mm_token_type_ids
        mask[row, cols] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "mm_token_type_ids": types}
    if with_segment_ids:
        out["segment_ids"] = torch.where(mask.bool(), 0, -1)
    out.update(concat_visuals(samples))
    return out
