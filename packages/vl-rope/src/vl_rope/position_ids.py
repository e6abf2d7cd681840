"""Multimodal (T, H, W) position ids for MRoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and GLM-4.1V/4.5V.

Follows REFERENCE.md section 1. Walking a row's runs of equal modality, a text
run of length ``n`` takes ``p + arange(n)`` on all three axes; a vision run with
grid ``(t, h, w)`` and merge ``m`` takes ``T = p + t_index``, ``H = p + arange(h/m)``,
``W = p + arange(w/m)`` (meshgrid in t, h, w order) and moves ``p`` on by the run's
*advance*. Qwen3-VL and GLM split a video into its temporal patches first (each
a ``t = 1`` run; timestamps between them tell time); Qwen2.5-VL scales the
temporal index by ``second_per_grid_t * tokens_per_second``.

The whole batch is computed at once. Runs of equal modality are found with one
comparison over the flat ``[B * L]`` tokens (padding is a run of its own, left in
place); each run's start position is the exclusive cumulative sum of the runs'
advances within its row (or packed sample). Runs are cut into *lines* (``w/m``
vision tokens sharing T and H, or a whole text run), and lines are expanded to
tokens with one gather and a multiply-add per axis. Nothing loops in Python
per token, run or image, and no per-token division is needed.

A vision run split by padding in the middle of a row (a mask with holes inside
an image) is rejected as a run-count mismatch rather than silently joined.

Notation: ``B`` batch, ``L`` sequence, ``N`` non-padding tokens, ``m`` spatial merge size.
"""

from __future__ import annotations

from typing import Literal

import torch

from ._runs import PAD, Runs, VisionAdvance, vision_grids

Style = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"]

__all__ = ["Style", "VisionAdvance", "decode_position_ids", "get_packed_rope_index", "get_rope_index"]

# (image, video, video_start, video_end) token ids of each family's tokenizer
_DEFAULT_IDS: dict[str, tuple[int, int, int | None, int | None]] = {
    "qwen2_vl": (151655, 151656, None, None),
    "qwen2_5_vl": (151655, 151656, None, None),
    "qwen3_vl": (151655, 151656, None, None),
    "glm4v": (151343, 151344, 151341, 151342),
}


def _modality(
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor | None,
    ids: tuple[int, int, int | None, int | None],
    style: str,
) -> torch.Tensor:
    if mm_token_type_ids is not None:
        if mm_token_type_ids.shape != input_ids.shape:
            raise ValueError(
                f"mm_token_type_ids has shape {tuple(mm_token_type_ids.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}"
            )
        mod = mm_token_type_ids.long()
        bad = (mod < 0) | (mod > 2)
        if bool(bad.any()):
            raise ValueError(f"mm_token_type_ids must be 0 (text), 1 (image) or 2 (video); found {int(mod[bad][0])}")
        return mod
    image_id, video_id, video_start, video_end = ids
    mod = (input_ids == image_id).long() + 2 * (input_ids == video_id).long()
    if style == "glm4v" and video_start is not None and video_end is not None:
        # GLM writes video frames with the image token: inside <|begin_of_video|>...<|end_of_video|> it is video
        inside = torch.cumsum(input_ids == video_start, 1) > torch.cumsum(input_ids == video_end, 1)
        mod = torch.where((mod == 1) & inside, torch.full_like(mod, 2), mod)
    return mod


def _check_same_shape(name: str, t: torch.Tensor | None, shape: torch.Size) -> None:
    if t is not None and t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(shape)}")


def get_rope_index(
    input_ids: torch.Tensor,
    *,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    image_token_id: int | None = None,
    video_token_id: int | None = None,
    spatial_merge_size: int = 2,
    style: Style = "qwen3_vl",
    second_per_grid_ts: torch.Tensor | list[float] | None = None,
    tokens_per_second: float | None = None,
    segment_ids: torch.Tensor | None = None,
    vision_advance: VisionAdvance = "extent",
    video_start_token_id: int | None = None,
    video_end_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D MRoPE position ids for a batch of multimodal token rows.

    Args:
        input_ids: ``[B, L]`` token ids, each image/video (temporal patch, for
            ``qwen3_vl``/``glm4v``) a contiguous run of placeholder tokens.
        image_grid_thw: ``[n_images, 3]`` patch grids, in the order the images appear (row by row).
        video_grid_thw: ``[n_videos, 3]`` patch grids, likewise.
        attention_mask: ``[B, L]``, 0 at padding (left or right); padding gets position 0.
        mm_token_type_ids: ``[B, L]`` modality per token (0 text, 1 image, 2 video); when
            absent it is read from the image/video token ids.
        image_token_id: Image placeholder id (default: the style's tokenizer, 151655 for Qwen).
        video_token_id: Video placeholder id (default: the style's tokenizer, 151656 for Qwen).
        spatial_merge_size: ``m``; each vision run holds ``t*h*w/m^2`` tokens.
        style: ``"qwen2_vl"``, ``"qwen2_5_vl"``, ``"qwen3_vl"`` or ``"glm4v"``.
        second_per_grid_ts: ``qwen2_5_vl`` only: seconds per temporal patch of each video (default 1).
        tokens_per_second: ``qwen2_5_vl`` only: temporal positions per second (2 in the released
            checkpoints' ``vision_config``); required when videos are present.
        segment_ids: ``[B, L]`` packed-sample ids: positions restart at 0 wherever the id changes
            within a row (negative ids count as padding). See ``get_packed_rope_index``.
        vision_advance: How far the position moves past a vision run: ``"extent"``,
            ``max(h, w) / m`` (transformers 5.x), or ``"max_position"``, the run's largest
            position + 1 (the original Qwen2/2.5-VL release and vLLM). They differ only for
            multi-frame ``qwen2_vl``/``qwen2_5_vl`` videos.
        video_start_token_id: ``glm4v`` without ``mm_token_type_ids``: image tokens between a
            video start and end token are video frames (default 151341).
        video_end_token_id: See ``video_start_token_id`` (default 151342).

    Returns:
        ``(position_ids [3, B, L], deltas [B, 1])``, both int64; ``delta = max position + 1 -
        (non-padding tokens)`` per row, so generated token ``i`` (0-based, after the prompt)
        sits at ``n_valid + i + delta`` (see ``decode_position_ids``).

    Raises:
        ValueError: A shape mismatch, malformed grid (non-positive, h or w not divisible by
            ``m``), or vision runs that do not match the grids (count of runs, run length vs
            ``t*h*w/m^2``); the message names the mismatch and both numbers.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    if style not in _DEFAULT_IDS:
        raise ValueError(f"unknown style {style!r}; expected one of {sorted(_DEFAULT_IDS)}")
    if vision_advance not in ("extent", "max_position"):
        raise ValueError(f"vision_advance must be 'extent' or 'max_position', got {vision_advance!r}")
    shape, device, m = input_ids.shape, input_ids.device, spatial_merge_size
    _check_same_shape("attention_mask", attention_mask, shape)
    _check_same_shape("segment_ids", segment_ids, shape)
    defaults = _DEFAULT_IDS[style]
    ids = (
        defaults[0] if image_token_id is None else image_token_id,
        defaults[1] if video_token_id is None else video_token_id,
        defaults[2] if video_start_token_id is None else video_start_token_id,
        defaults[3] if video_end_token_id is None else video_end_token_id,
    )

    batch, width = shape
    valid = torch.ones(shape, dtype=torch.bool, device=device) if attention_mask is None else attention_mask != 0
    if segment_ids is not None:
        valid = valid & (segment_ids >= 0)
    mod = _modality(input_ids, mm_token_type_ids, ids, style).masked_fill(~valid, PAD)

    # runs of equal modality; rows (and packed samples) always start a new run and a new segment
    boundary = torch.zeros(shape, dtype=torch.bool, device=device)
    boundary[:, 0] = True
    if segment_ids is not None:
        boundary[:, 1:] |= segment_ids[:, 1:] != segment_ids[:, :-1]
    run_start = boundary.clone()
    run_start[:, 1:] |= mod[:, 1:] != mod[:, :-1]
    runs = Runs.find(run_start.view(-1), mod.view(-1), boundary.view(-1), width)

    split = style in ("qwen3_vl", "glm4v")
    for modality, grid_thw, name in ((1, image_grid_thw, "image_grid_thw"), (2, video_grid_thw, "video_grid_thw")):
        interval = None
        if modality == 2 and style == "qwen2_5_vl" and grid_thw is not None:
            interval = _qwen25_intervals(grid_thw, second_per_grid_ts, tokens_per_second, device)
        grids = vision_grids(grid_thw, name, m, split, interval, device)
        runs.place_vision(modality, grids, name, m, vision_advance)

    position_ids = runs.positions().view(3, batch, width)
    n_valid = valid.sum(1)
    highest = runs.row_max(batch)
    deltas = torch.where(n_valid > 0, highest + 1 - n_valid, torch.zeros_like(n_valid))
    return position_ids, deltas.unsqueeze(1)


def _qwen25_intervals(
    grid_thw: torch.Tensor,
    second_per_grid_ts: torch.Tensor | list[float] | None,
    tokens_per_second: float | None,
    device: torch.device,
) -> torch.Tensor:
    n_videos = len(grid_thw)
    if tokens_per_second is None:
        raise ValueError(
            "style 'qwen2_5_vl' with videos needs tokens_per_second (vision_config.tokens_per_second; "
            "2 in the released Qwen2.5-VL checkpoints)"
        )
    if second_per_grid_ts is None:
        seconds = torch.ones(n_videos, dtype=torch.float32, device=device)
    else:
        seconds = torch.as_tensor(second_per_grid_ts, device=device)
        if not seconds.is_floating_point():
            seconds = seconds.float()
        if seconds.shape != (n_videos,):
            raise ValueError(
                f"second_per_grid_ts has {seconds.numel()} values but video_grid_thw describes {n_videos} videos"
            )
    # float32 like the processor's tensor, so `(t_index * interval).long()` truncates exactly as transformers does
    return (seconds * tokens_per_second).float()


def get_packed_rope_index(
    input_ids: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    **kwargs: object,
) -> torch.Tensor:
    """Position ids for packed rows: positions restart at 0 at every sample.

    Args:
        input_ids: ``[B, L]`` packed rows (or ``[L]`` with ``cu_seqlens``).
        cu_seqlens: ``[S + 1]`` cumulative sample lengths over the flattened ``B * L`` tokens
            (FlashAttention varlen convention); samples must not cross a row boundary.
        segment_ids: ``[B, L]`` sample id per token (negative = padding). Give this or ``cu_seqlens``.
        **kwargs: Everything else ``get_rope_index`` takes (grids, mask, style, ...).

    Returns:
        ``position_ids [3, B, L]``; each sample's positions equal ``get_rope_index`` on that sample alone.
    """
    if (cu_seqlens is None) == (segment_ids is None):
        raise ValueError("give exactly one of cu_seqlens or segment_ids")
    squeeze = input_ids.dim() == 1
    ids = input_ids.unsqueeze(0) if squeeze else input_ids
    if cu_seqlens is not None:
        segment_ids = _segments_from_cu_seqlens(cu_seqlens, ids.shape)
    position_ids, _ = get_rope_index(ids, segment_ids=segment_ids, **kwargs)  # type: ignore[arg-type]
    return position_ids[:, 0] if squeeze else position_ids


def _segments_from_cu_seqlens(cu_seqlens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    cu = cu_seqlens.long()
    total = shape[0] * shape[1]
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must be a 1-D [S + 1] tensor starting at 0, got {cu.tolist()[:8]}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    if int(cu[-1]) > total:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])} but input_ids hold {total} tokens")
    flat = torch.full((total,), -1, dtype=torch.long, device=cu.device)
    lengths = cu[1:] - cu[:-1]
    flat[: int(cu[-1])] = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)
    segments = flat.view(shape)
    row_of_start = cu[:-1][lengths > 0] // shape[1]
    row_of_end = (cu[1:][lengths > 0] - 1) // shape[1]
    if bool((row_of_start != row_of_end).any()):
        raise ValueError(f"a cu_seqlens sample crosses a row boundary (rows hold {shape[1]} tokens)")
    return segments


def decode_position_ids(
    deltas: torch.Tensor,
    *,
    past_length: int | None = None,
    num_new: int = 1,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions ``[3, B, num_new]`` of tokens generated after a multimodal prompt.

    Generated tokens are text, so all three axes agree. With ``attention_mask``
    (``[B, past + num_new]``, 1 at real tokens) a token's position is its count of
    real tokens before it plus ``delta``; without it, ``past_length + i + delta``.

    Args:
        deltas: ``[B, 1]`` from ``get_rope_index``.
        past_length: Tokens already in the cache (needed without ``attention_mask``).
        num_new: Tokens in this step.
        attention_mask: Mask over the whole sequence so far, new tokens included.
    """
    if deltas.dim() != 2 or deltas.shape[1] != 1:
        raise ValueError(f"deltas must be [B, 1], got shape {tuple(deltas.shape)}")
    if attention_mask is not None:
        if attention_mask.shape[0] != deltas.shape[0]:
            raise ValueError(f"attention_mask has {attention_mask.shape[0]} rows but deltas has {deltas.shape[0]}")
        base = (attention_mask.long().cumsum(-1) - 1)[:, -num_new:].clamp(min=0)
    else:
        if past_length is None:
            raise ValueError("give past_length or attention_mask")
        base = torch.arange(past_length, past_length + num_new, device=deltas.device).expand(deltas.shape[0], -1)
    return (base + deltas).unsqueeze(0).expand(3, -1, -1)
