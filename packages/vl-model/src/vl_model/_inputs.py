"""Visual-input plumbing of the VLM: output records, input checks, DeepStack joining, packed-row ids.

Kept apart from ``modeling.py`` so the model classes read as the data flow of the Qwen3-VL report
(arXiv 2511.21631, section 2): encode, scatter into placeholders, position, decode.

Notation: ``B`` batch, ``L`` sequence, ``H`` hidden size, ``V`` visual positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput

from vl_vision import VisionOutput

__all__ = [
    "VLCausalLMOutput",
    "VLModelOutput",
    "check_pairs",
    "join_deepstack",
    "segments_from_cu_seqlens",
]


@dataclass
class VLModelOutput(ModelOutput):
    """What ``VLModel`` returns: decoder output plus the MRoPE deltas and router logits."""

    last_hidden_state: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    rope_deltas: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class VLCausalLMOutput(ModelOutput):
    """What ``VLForConditionalGeneration`` returns.

    ``logits`` is ``None`` when ``labels`` are given (the loss needs only the supervised
    positions); pass ``return_logits=True`` to get them anyway.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    rope_deltas: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


def check_pairs(pixels: torch.Tensor | None, grid: torch.Tensor | None, kind: str) -> None:
    names = ("pixel_values", "image_grid_thw") if kind == "image" else ("pixel_values_videos", "video_grid_thw")
    if (pixels is None) != (grid is None):
        given, missing = names if grid is None else names[::-1]
        raise ValueError(f"{given} was given without {missing}: {kind} inputs need both the patches and their grids")
    if pixels is not None and grid is not None:
        expected = int(grid.long().prod(-1).sum())
        if pixels.shape[0] != expected:
            raise ValueError(
                f"{names[0]} has {pixels.shape[0]} patches but {names[1]} describes {expected} "
                f"(sum of t*h*w over {grid.shape[0]} {kind}s)"
            )


def segments_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """``[B, L]`` sample ids from FlashAttention-style ``cu_seqlens`` (``-1`` after the last sample)."""
    cu = cu_seqlens.long().flatten()
    total = batch * length
    if int(cu[0]) != 0 or int(cu[-1]) > total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to at most {total} (= B * L), got {cu.tolist()[:8]}")
    flat = torch.full((total,), -1, dtype=torch.long, device=cu.device)
    flat[: int(cu[-1])] = torch.repeat_interleave(torch.arange(len(cu) - 1, device=cu.device), cu[1:] - cu[:-1])
    return flat.view(batch, length)


def join_deepstack(
    image_mask: torch.Tensor | None,
    image_out: VisionOutput | None,
    video_mask: torch.Tensor | None,
    video_out: VisionOutput | None,
) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
    """Visual positions ``[B, L]`` and per-layer DeepStack features ``[V, H]`` in position order."""
    if image_mask is None or image_out is None:
        if video_mask is None or video_out is None:
            return None, None
        return video_mask, list(video_out.deepstack)
    if video_mask is None or video_out is None:
        return image_mask, list(image_out.deepstack)
    visual = image_mask | video_mask
    is_image = image_mask[visual]
    joined = []
    for img, vid in zip(image_out.deepstack, video_out.deepstack):
        both = img.new_zeros(int(visual.sum()), img.shape[-1])
        both[is_image] = img
        both[~is_image] = vid.to(img.dtype)
        joined.append(both)
    return visual, joined
