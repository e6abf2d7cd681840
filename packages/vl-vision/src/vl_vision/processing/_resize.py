"""Target sizes for native-resolution vision input: ``smart_resize`` for images and video clips.

Implements the dynamic-resolution rule of Qwen2-VL / Qwen3-VL (Qwen3-VL technical report,
arXiv 2511.21631, section 2 "model architecture: vision encoder"): height and width are rounded
to multiples of ``factor`` (= patch size x merge size, 32 for Qwen3-VL), then scaled so that the
pixel count lies in ``[min_pixels, max_pixels]`` while keeping the aspect ratio. For a video clip
the pixel budget covers all its frames (``frames x height x width``).

Notation: ``factor`` = patch size x spatial merge size; ``beta`` = the uniform scale that brings
the pixel count into budget.
"""

from __future__ import annotations

import math

MAX_ASPECT_RATIO = 200
"""Largest accepted ``max(h, w) / min(h, w)``; above it the patch grid would be degenerate."""

DEFAULT_MIN_PIXELS = 256 * 256
"""Qwen3-VL image processor default (``size["shortest_edge"]``): 64 tokens of 32 x 32 pixels."""

DEFAULT_MAX_PIXELS = 4096 * 4096
"""Qwen3-VL image processor default (``size["longest_edge"]``): 16,384 tokens of 32 x 32 pixels."""


def _check_sizes(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got height={height} and width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio {ratio:.1f} (height={height}, width={width}) is above the maximum of {MAX_ASPECT_RATIO}"
        )


def _check_budget(factor: int, min_pixels: int, max_pixels: int) -> None:
    if factor < 1:
        raise ValueError(f"factor must be positive, got {factor}")
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")


def smart_resize(
    height: int,
    width: int,
    factor: int = 32,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Target ``(height, width)`` of an image: multiples of ``factor`` with a pixel count in budget.

    Both sides are first rounded to the nearest multiple of ``factor``. If the rounded area exceeds
    ``max_pixels`` the image is scaled down by ``beta = sqrt(h * w / max_pixels)`` and both sides are
    floored to multiples of ``factor`` (never below ``factor``); if it is below ``min_pixels`` it is
    scaled up by ``beta = sqrt(min_pixels / (h * w))`` and both sides are ceiled. A 1 x 1 image is
    therefore upscaled (to 256 x 256 with the Qwen3-VL defaults), as transformers does.

    Args:
        height: Input height in pixels.
        width: Input width in pixels.
        factor: Side multiple (patch size x merge size; 32 for Qwen3-VL).
        min_pixels: Smallest accepted pixel count of the result.
        max_pixels: Largest accepted pixel count of the result (may be exceeded only when an
            aspect ratio near 200 forces the short side to ``factor``).

    Returns:
        The target ``(height, width)``, both multiples of ``factor``.

    Raises:
        ValueError: A side is not positive, the aspect ratio is above 200, or ``min_pixels`` is
            larger than ``max_pixels``.
    """
    _check_sizes(height, width)
    _check_budget(factor, min_pixels, max_pixels)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    factor: int = 32,
    temporal_factor: int = 2,
    min_pixels: int = 128 * 32 * 32,
    max_pixels: int = 768 * 32 * 32,
) -> tuple[int, int]:
    """Target frame ``(height, width)`` of a clip whose total budget covers all frames.

    Like :func:`smart_resize`, but the area compared with the budget is
    ``round(num_frames / temporal_factor) * temporal_factor * h * w`` and ``beta`` includes
    ``num_frames``. Frames smaller than ``factor`` on a side are first scaled up (keeping the
    aspect ratio) so that the short side reaches ``factor``. Matches transformers' Qwen3-VL video
    ``smart_resize`` except that a clip of fewer than ``temporal_factor`` frames is budgeted as
    ``temporal_factor`` frames (it is padded to that length later) instead of being rejected.

    Args:
        num_frames: Number of sampled frames (before padding to a multiple of ``temporal_factor``).
        height: Frame height in pixels.
        width: Frame width in pixels.
        factor: Side multiple (patch size x merge size).
        temporal_factor: Temporal patch size (frames per temporal patch).
        min_pixels: Smallest total pixel count over all frames.
        max_pixels: Largest total pixel count over all frames.

    Returns:
        The target ``(height, width)`` of every frame, multiples of ``factor``.

    Raises:
        ValueError: ``num_frames`` is not positive, a side is not positive, the aspect ratio is
            above 200, or ``min_pixels`` is larger than ``max_pixels``.
    """
    if num_frames < 1:
        raise ValueError(f"a video needs at least 1 frame, got num_frames={num_frames}")
    _check_sizes(height, width)
    _check_budget(factor, min_pixels, max_pixels)
    num_frames = max(num_frames, temporal_factor)
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
        _check_sizes(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
