"""The files a processor is saved as: the official Qwen3-VL layout, which plain transformers reads.

``preprocessor_config.json`` (``Qwen2VLImageProcessorFast``) and ``video_preprocessor_config.json``
(``Qwen3VLVideoProcessor``), both naming ``processor_class = "Qwen3VLProcessor"``, with the Hub files'
fields (``size.shortest_edge`` / ``longest_edge`` are the pixel budgets). Settings transformers has no
field for are stored under a ``vl_`` prefix, which transformers keeps as plain attributes and we read back.
Folders written by earlier versions (our ``processor_config.json`` with nested settings) still load.

Notation: ``m`` merge size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["IMAGE_FILE", "VIDEO_FILE", "media_kwargs", "official_files"]

IMAGE_FILE, VIDEO_FILE = "preprocessor_config.json", "video_preprocessor_config.json"
_SHARED = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
_IMAGE_EXTRA = ("high_bit_depth", "min_side")
_VIDEO_EXTRA = ("high_bit_depth", "max_frame_tokens", "timestamp_style")
_PREFIX = "vl_"


def _common(proc: Any) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(proc, k) for k in _SHARED}
    out["image_mean"], out["image_std"] = list(out["image_mean"]), list(out["image_std"])
    out["size"] = {"shortest_edge": int(proc.min_pixels), "longest_edge": int(proc.max_pixels)}
    out.update(do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True, rescale_factor=1 / 255)
    out["processor_class"] = "Qwen3VLProcessor"
    return out


def official_files(image_processor: Any, video_processor: Any) -> dict[str, dict[str, Any]]:
    """``{file name: content}`` of the two preprocessor files for our image and video processors."""
    image = _common(image_processor) | {"image_processor_type": "Qwen2VLImageProcessorFast"}
    image.update({_PREFIX + k: getattr(image_processor, k) for k in _IMAGE_EXTRA})
    video = _common(video_processor) | {"video_processor_type": "Qwen3VLVideoProcessor", "do_sample_frames": True}
    video.update({k: getattr(video_processor, k) for k in ("fps", "min_frames", "max_frames")})
    video.update({_PREFIX + k: getattr(video_processor, k) for k in _VIDEO_EXTRA})
    return {IMAGE_FILE: image, VIDEO_FILE: video}


def media_kwargs(config: Mapping[str, Any], *, video: bool) -> dict[str, Any]:
    """Our ``ImageProcessor`` / ``VideoProcessor`` arguments from a preprocessor file (official or ours)."""
    out: dict[str, Any] = {k: config[k] for k in _SHARED if k in config}
    size = config.get("size") or {}
    low = size.get("shortest_edge", config.get("min_pixels"))
    high = size.get("longest_edge", config.get("max_pixels"))
    if low is not None:
        out["min_pixels"] = int(low)
    if high is not None:
        out["max_pixels"] = int(high)
    extra = _VIDEO_EXTRA if video else _IMAGE_EXTRA
    out.update({k: config[_PREFIX + k] for k in extra if _PREFIX + k in config})
    if video:
        out.update({k: config[k] for k in ("fps", "min_frames", "max_frames") if config.get(k) is not None})
    return out
