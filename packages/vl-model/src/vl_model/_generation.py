"""MRoPE positions for ``generate``: the prompt's 3-D positions, or a continuation of a cached prompt.

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

from vl_rope import get_rope_index

from ._inputs import visible_vision_grids

if TYPE_CHECKING:
    from .modeling import VLForConditionalGeneration

__all__ = ["generation_position_ids"]


def _modality(model: VLForConditionalGeneration, ids: torch.Tensor, mm_token_type_ids: Any) -> torch.Tensor:
    if isinstance(mm_token_type_ids, torch.Tensor) and mm_token_type_ids.shape == ids.shape:
        return mm_token_type_ids.long()
    config = model.config
    return (ids == config.image_token_id).long() + 2 * (ids == config.video_token_id).long()


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
        new = mm_token_type_ids if isinstance(mm_token_type_ids, torch.Tensor) else _modality(model, ids, None)
        if not bool(new[:, past:].any()):
            return (text + deltas.to(text.device)).unsqueeze(0).expand(3, -1, -1)
    mask = model_kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    modality = _modality(model, ids, mm_token_type_ids)
    image_grid, video_grid = visible_vision_grids(
        modality,
        mask,
        model_kwargs.get("image_grid_thw"),
        model_kwargs.get("video_grid_thw"),
        _modality(model, ids, None),
    )
    position_ids, deltas = get_rope_index(
        ids,
        image_grid_thw=image_grid,
        video_grid_thw=video_grid,
        attention_mask=mask,
        mm_token_type_ids=modality,
        image_token_id=model.config.image_token_id,
        video_token_id=model.config.video_token_id,
        spatial_merge_size=model.config.vision_config.spatial_merge_size,
        style="qwen3_vl",
    )
    model.model.rope_deltas = deltas
    return position_ids
