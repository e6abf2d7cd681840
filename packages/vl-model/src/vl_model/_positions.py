"""MRoPE positions of the VLM: a prompt's 3-D positions, decoding steps, and ``generate``'s positions.

Positions come from ``vl_rope.get_rope_index(style="qwen3_vl")`` with the grids of the placeholder runs
that padding does not hide (:func:`rope_index`); decoding steps continue each row from its cached
``rope_deltas`` (:func:`continued_positions`).

transformers' ``generate`` asks the model for the prompt's ``position_ids`` once and then adds one per
new token. For Qwen3-VL those are 3-D (``vl_rope.get_rope_index``; Qwen3-VL report arXiv 2511.21631,
section 2.2), and the per-row ``rope_deltas`` (how far vision runs moved the positions) are kept on
``model.model``. When ``generate`` continues from a ``past_key_values`` whose uncached tokens hold no
new image or video placeholder, the positions are the text positions plus those deltas, as in
transformers' Qwen3-VL: the images need not be passed again, and a ``mm_token_type_ids`` of the
original prompt's length is accepted.

Notation: ``B`` batch, ``S`` cached + new tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vl_rope import decode_position_ids, get_rope_index

from ._inputs import visible_vision_grids

if TYPE_CHECKING:
    from .modeling import VLForConditionalGeneration

__all__ = ["continued_positions", "generation_position_ids", "rope_index"]


def _placeholders(config: Any, ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` modality read from the placeholder ids (0 text, 1 image, 2 video)."""
    return (ids == config.image_token_id).long() + 2 * (ids == config.video_token_id).long()


def rope_index(
    config: Any,
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([3, B, L] positions, [B, 1] deltas)`` of prompts; padded placeholder runs take no grid.

    ``config`` is the ``VLConfig`` (token ids, spatial merge size).
    """
    mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    placeholders = _placeholders(config, input_ids)
    modality = placeholders if mm_token_type_ids is None else mm_token_type_ids
    image_grid, video_grid = visible_vision_grids(modality, mask, image_grid_thw, video_grid_thw, placeholders)
    return get_rope_index(
        input_ids,
        image_grid_thw=image_grid,
        video_grid_thw=video_grid,
        attention_mask=mask,
        mm_token_type_ids=modality,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        spatial_merge_size=config.vision_config.spatial_merge_size,
        style="qwen3_vl",
        segment_ids=segment_ids,
    )


def continued_positions(
    deltas: torch.Tensor | None,
    batch: int,
    length: int,
    past: int,
    attention_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """``[3, B, length]`` positions of tokens after ``past`` cached ones, from the rows' cached deltas."""
    if deltas is None or deltas.shape[0] != batch:
        deltas = torch.zeros(batch, 1, dtype=torch.long, device=device)
    mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
    return decode_position_ids(
        deltas.to(device),
        past_length=past,
        num_new=length,
        attention_mask=None if mask is None or mask.shape[1] != past + length else mask.to(device),
    )


def generation_position_ids(
    model: VLForConditionalGeneration, inputs_tensor: torch.Tensor, model_kwargs: dict[str, Any], text: torch.Tensor
) -> torch.Tensor:
    """``[3, B, S]`` positions of the prompt (or ``text`` itself when the prompt is given as embeddings).

    Args:
        model: The generating model (its ``model.rope_deltas`` is read and updated).
        inputs_tensor: ``generate``'s main input.
        model_kwargs: ``generate``'s model keyword arguments (``input_ids``, ``attention_mask``, grids,
            ``mm_token_type_ids``, ``past_key_values``).
        text: ``[B, S]`` (or ``[1, S]``) text positions from ``GenerationMixin``.
    """
    ids = model_kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] == 0:
        ids = inputs_tensor
    if ids.dim() != 2 or ids.is_floating_point():
        model.model.rope_deltas = torch.zeros(ids.shape[0], 1, dtype=torch.long, device=ids.device)
        return text.expand(ids.shape[0], -1).unsqueeze(0).expand(3, -1, -1)
    cache = model_kwargs.get("past_key_values")
    past = cache.get_seq_length() if cache is not None else 0
    mm_token_type_ids = model_kwargs.get("mm_token_type_ids")
    deltas = model.model.rope_deltas
    if past > 0 and deltas is not None and deltas.shape[0] == ids.shape[0]:
        new = mm_token_type_ids if isinstance(mm_token_type_ids, torch.Tensor) else _placeholders(model.config, ids)
        if not bool(new[:, past:].any()):
            return (text + deltas.to(text.device)).unsqueeze(0).expand(3, -1, -1)
    mask = model_kwargs.get("attention_mask")
    if not (isinstance(mm_token_type_ids, torch.Tensor) and mm_token_type_ids.shape == ids.shape):
        mm_token_type_ids = None  # e.g. the prompt's, shorter than the prompt plus generated tokens
    position_ids, deltas = rope_index(
        model.config,
        ids,
        mm_token_type_ids,
        model_kwargs.get("image_grid_thw"),
        model_kwargs.get("video_grid_thw"),
        mask if isinstance(mask, torch.Tensor) else None,
    )
    model.model.rope_deltas = deltas
    return position_ids
