"""Visual-input plumbing of the VLM: output records, input checks, DeepStack joining, packed-row ids.

Kept apart from ``modeling.py`` so the model classes read as the data flow of the Qwen3-VL report
(arXiv 2511.21631, section 2): encode, scatter into placeholders, position, decode. The output records
have transformers' field order (``CausalLMOutputWithPast`` / ``MoeCausalLMOutputWithPast``,
``BaseModelOutputWithDeepstackFeatures``), so attribute access and ``to_tuple()`` match its Qwen3-VL
classes.

Notation: ``B`` batch, ``L`` sequence, ``H`` hidden size, ``V`` visual positions, ``n`` images or videos,
``m`` spatial merge size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling, ModelOutput

from vl_vision import VisionOutput

__all__ = [
    "VLCausalLMOutput",
    "VLModelOutput",
    "VLVisionFeatures",
    "check_pairs",
    "check_finite_pixels",
    "check_token_ids",
    "join_deepstack",
    "segments_from_cu_seqlens",
    "visible_vision_grids",
    "vision_output_from",
]


@dataclass
class VLModelOutput(ModelOutput):
    """What ``VLModel`` returns (``MoeModelOutputWithPast``'s fields; ``router_logits`` only for MoE)."""

    last_hidden_state: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class VLCausalLMOutput(ModelOutput):
    """What ``VLForConditionalGeneration`` returns (``MoeCausalLMOutputWithPast``'s fields and order).

    A dense model leaves ``aux_loss`` and ``router_logits`` at None, so its ``to_tuple()`` equals that of
    transformers' ``CausalLMOutputWithPast``. ``logits`` is None only when the caller asked for the
    labelled-only loss (``return_logits=False``).
    """

    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class VLVisionFeatures(BaseModelOutputWithPooling):
    """What ``get_image_features`` / ``get_video_features`` return (transformers' ``BaseModelOutputWithDeepstackFeatures``).

    Attributes:
        last_hidden_state: ``[N, D]`` tower output before the merge head (all images).
        pooler_output: One ``[N_i / m^2, H]`` tensor of merged tokens per image or video.
        deepstack_features: Per DeepStack layer, one ``[N_i / m^2, H]`` tensor per image or video.
    """

    pooler_output: tuple[torch.Tensor, ...] | torch.Tensor | None = None  # type: ignore[assignment]
    deepstack_features: list[tuple[torch.Tensor, ...]] | None = None


def vision_output_from(features: Any) -> VisionOutput:
    """Our ``VisionOutput`` (all images concatenated) from a ``VLVisionFeatures``-like record.

    Accepts what transformers' ``generate`` hands over as ``mm_encoder_outputs[modality]``: per-image
    sequences (possibly repeated for beams) or already concatenated tensors.
    """

    def joined(value: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        return value if isinstance(value, torch.Tensor) else torch.cat(list(value))

    deepstack = [joined(f) for f in (getattr(features, "deepstack_features", None) or [])]
    return VisionOutput(merged=joined(features.pooler_output), deepstack=deepstack)


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


def check_finite_pixels(pixel_values: torch.Tensor, kind: str, *, training: bool) -> None:
    """Raise naming the first NaN / inf patch row: non-finite pixels turn every visual token into NaN.

    Like :func:`check_token_ids` it would sync the host on an accelerator, so it runs on CPU pixels always, on
    other devices only outside training, and never while compiling.
    """
    if torch.compiler.is_compiling() or pixel_values.numel() == 0 or not pixel_values.is_floating_point():
        return
    if training and pixel_values.device.type != "cpu":
        return
    finite = torch.isfinite(pixel_values)
    if bool(finite.all()):
        return
    row = int((~finite.all(-1)).nonzero()[0, 0])
    raise ValueError(
        f"pixel_values{'_videos' if kind == 'video' else ''} hold NaN or inf (first at patch row {row} of "
        f"{pixel_values.shape[0]}): the {kind} was not normalised by the processor, or came from a broken file"
    )


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, *, training: bool) -> None:
    """Raise naming the first token id outside ``[0, vocab_size)``, with its row and position.

    An embedding lookup out of range is an index error on CPU and a device-side assert on a GPU, neither
    naming the id. The check reads the ids' extremes, so on an accelerator it would sync the host: it
    runs on CPU ids always, on other devices only outside training, and never while compiling.
    """
    if torch.compiler.is_compiling() or input_ids.numel() == 0:
        return
    if training and input_ids.device.type != "cpu":
        return
    low, high = torch.aminmax(input_ids)
    if int(low) >= 0 and int(high) < vocab_size:
        return
    bad = ((input_ids < 0) | (input_ids >= vocab_size)).nonzero()[0].tolist()
    token = int(input_ids[tuple(bad)])
    where = f"row {bad[0]}, position {bad[1]}" if len(bad) == 2 else f"index {bad}"
    raise ValueError(
        f"input_ids hold token id {token} at {where}, outside the vocabulary of {vocab_size} ids "
        f"(the input embedding table; text_config.vocab_size): the tokenizer and the model do not match, "
        f"or the embeddings need resize_token_embeddings"
    )


def _split_videos(grid: torch.Tensor) -> torch.Tensor:
    """One ``t = 1`` grid per temporal patch (Qwen3-VL places each with its own timestamp)."""
    split = grid.repeat_interleave(grid[:, 0].long(), dim=0).clone()
    split[:, 0] = 1
    return split


def _visible_runs(modality: torch.Tensor, seen: torch.Tensor, kind: int, n_grids: int) -> torch.Tensor | None:
    """Per run of ``kind`` placeholders: whether any of its tokens is unpadded (None: not ``n_grids`` runs)."""
    inside = modality == kind
    start = inside.clone()
    start[:, 1:] &= ~inside[:, :-1]
    n_runs = int(start.sum())
    if n_runs != n_grids:
        return None
    run_of_token = start.reshape(-1).cumsum(0) - 1
    visible = torch.zeros(n_runs, dtype=torch.bool, device=modality.device)
    visible[run_of_token[inside.reshape(-1) & seen]] = True
    return visible


def visible_vision_grids(
    modality: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    placeholders: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The grids of the placeholder runs that are not wholly under the padding mask.

    transformers' Qwen3-VL drops padded tokens before walking the modality runs, so a run of image
    placeholders that lies under ``attention_mask == 0`` takes no positions and no grid. This gives
    ``vl_rope.get_rope_index`` (which treats padding as its own run) the grids of the runs it will see.
    A video with a hidden temporal patch comes back split into one ``t = 1`` grid per temporal patch
    (how the position code reads videos anyway). When the runs cannot be matched to the grids one to
    one, the grids are returned unchanged (the position code names the mismatch).

    Args:
        modality: ``[B, L]`` 0 text, 1 image, 2 video (``mm_token_type_ids``, or from the placeholder ids).
        attention_mask: ``[B, L]``, 0 at padding.
        image_grid_thw: ``[n_images, 3]``.
        video_grid_thw: ``[n_videos, 3]``.
        placeholders: The modality read from the placeholder ids, tried when ``modality`` does not mark
            every run (a ``mm_token_type_ids`` that zeroes padding hides the padded runs).
    """
    if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.bool().all()):
        return image_grid_thw, video_grid_thw
    seen = attention_mask.bool().reshape(-1).to(modality.device)
    out: list[torch.Tensor | None] = []
    for kind, grid in ((1, image_grid_thw), (2, video_grid_thw)):
        if grid is None:
            out.append(None)
            continue
        runs_grid = _split_videos(grid) if kind == 2 else grid
        visible = _visible_runs(modality, seen, kind, runs_grid.shape[0])
        if visible is None and placeholders is not None:
            visible = _visible_runs(placeholders.to(modality.device), seen, kind, runs_grid.shape[0])
        if visible is None or bool(visible.all()):
            out.append(grid)
        else:
            out.append(runs_grid[visible.to(grid.device)])
    return out[0], out[1]
