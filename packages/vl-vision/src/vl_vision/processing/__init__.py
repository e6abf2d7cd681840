"""Torchvision-free image and video processing of the Qwen3-VL family (Pillow, numpy, torch only).

Public names:

- :func:`smart_resize` / :func:`smart_resize_video`: target sizes under pixel budgets.
- :class:`ImageProcessor`: images -> ``pixel_values [N, 3*2*16*16]`` + ``image_grid_thw``.
- :class:`VideoProcessor`: videos -> ``pixel_values_videos`` + ``video_grid_thw`` + timestamps.
- :func:`sample_frame_indices`, :func:`patch_times`, :func:`format_timestamp`: fps sampling and
  ``<t seconds>`` / ``<hh:mm:ss.s>`` timestamp texts.
- :func:`open_image`, :func:`to_rgb_image`: decoding and RGB conversion with clear errors.
"""

from ._inputs import open_image, to_rgb_image
from ._resize import smart_resize, smart_resize_video
from .image import ImageBatch, ImageProcessor
from .timestamps import format_timestamp, patch_times, sample_frame_indices
from .video import VideoBatch, VideoProcessor

__all__ = [
    "ImageBatch",
    "ImageProcessor",
    "VideoBatch",
    "VideoProcessor",
    "format_timestamp",
    "open_image",
    "patch_times",
    "sample_frame_indices",
    "smart_resize",
    "smart_resize_video",
    "to_rgb_image",
]
