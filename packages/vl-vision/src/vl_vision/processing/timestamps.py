"""Frame sampling by fps and the textual timestamp of every temporal patch of a video.

Implements Qwen3-VL's text-timestamp scheme (Qwen3-VL technical report, arXiv 2511.21631,
section 2 "video timestamp"; REFERENCE.md sections 1 and 2): frames are sampled uniformly at a
target fps (clamped to ``[min_frames, max_frames]`` and to the number of frames), the clip is
padded to a multiple of the temporal patch size by repeating its last frame, and each temporal
patch is announced to the language model as ``<{t:.1f} seconds>`` where ``t`` is the mean time of
its first and last frame (``frame_index / video_fps``). Training also used an ``hh:mm:ss`` form.

Notation: ``n`` sampled frames; ``T`` temporal patch size; ``t`` a time in seconds.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal, TypeAlias

import numpy as np

TimestampStyle: TypeAlias = Literal["seconds", "hms"]
"""``"seconds"``: ``<3.5 seconds>`` (Qwen3-VL's processor); ``"hms"``: ``<00:00:03.5>``."""


def check_rate(value: Any, what: str) -> float:
    """``value`` as a float when it is a positive, finite real number (not a string or a bool).

    Raises:
        ValueError: Anything else, named by ``what`` (e.g. ``"video 0: video_fps"``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a positive finite number, got {value!r} ({type(value).__name__})")
    rate = float(value)
    if not math.isfinite(rate):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    if rate <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return rate


def sample_frame_indices(
    total_frames: int,
    *,
    video_fps: float,
    fps: float | None = 2.0,
    num_frames: int | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
) -> np.ndarray:
    """Indices of the frames to keep, uniformly spread over the clip.

    With ``fps``: ``n = int(total_frames / video_fps * fps)`` clamped to ``[min_frames, max_frames]``
    and then to ``total_frames``. With ``num_frames``: ``n = num_frames`` (at most
    ``total_frames``). The indices are ``round(linspace(0, total_frames - 1, n))`` (round half to
    even, as numpy does), so the first frame, and the last one when ``n >= 2``, are always kept.

    Args:
        total_frames: Frames in the source clip.
        video_fps: Frame rate of the source clip.
        fps: Target frames per second (ignored when ``num_frames`` is given).
        num_frames: Exact number of frames to sample instead of a rate.
        min_frames: Fewest frames an fps-sampled clip gets (if it has that many).
        max_frames: Most frames an fps-sampled clip gets.

    Returns:
        int64 ``[n]`` sorted frame indices.

    Raises:
        ValueError: Non-positive frame count or num_frames, an fps that is not a positive finite
            number, or ``min_frames > max_frames``.
    """
    if total_frames < 1:
        raise ValueError(f"a video needs at least 1 frame, got total_frames={total_frames}")
    video_fps = check_rate(video_fps, "video_fps")
    if min_frames > max_frames:
        raise ValueError(f"min_frames ({min_frames}) is larger than max_frames ({max_frames})")
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        count = min(num_frames, total_frames)
    elif fps is not None:
        count = int(total_frames / video_fps * check_rate(fps, "fps"))
        count = min(max(count, min_frames), max_frames, total_frames)
    else:
        count = min(max(total_frames, min_frames), max_frames, total_frames)
    return np.linspace(0, total_frames - 1, count).round().astype(np.int64)


def pad_indices(indices: Sequence[int], temporal_patch_size: int) -> list[int]:
    """Pad a frame-index list to a multiple of ``temporal_patch_size`` by repeating its last entry."""
    padded = [int(i) for i in indices]
    if not padded:
        raise ValueError("no frame indices given")
    padded += [padded[-1]] * (-len(padded) % temporal_patch_size)
    return padded


def patch_times(indices: Sequence[int], video_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Time in seconds of every temporal patch: the mean of its first and last frame's time.

    Args:
        indices: Source frame index of every sampled frame (padded or not; padding is applied here).
        video_fps: Frame rate of the source clip.
        temporal_patch_size: Frames per temporal patch.

    Returns:
        One time per temporal patch, ``(idx[k*T] + idx[k*T + T - 1]) / (2 * video_fps)``.
    """
    video_fps = check_rate(video_fps, "video_fps")
    padded = pad_indices(indices, temporal_patch_size)
    T = temporal_patch_size
    return [(padded[k] / video_fps + padded[k + T - 1] / video_fps) / 2 for k in range(0, len(padded), T)]


def format_timestamp(seconds: float, style: TimestampStyle = "seconds") -> str:
    """Text that announces a temporal patch to the language model.

    Args:
        seconds: Time in seconds (not negative).
        style: ``"seconds"`` gives ``<3.5 seconds>`` (one decimal, as Qwen3-VL's processor writes);
            ``"hms"`` gives ``<hh:mm:ss.s>``, e.g. ``<01:02:03.5>`` (our choice of the ``hh:mm:ss``
            form, keeping the same 0.1 s resolution).

    Returns:
        The timestamp text.

    Raises:
        ValueError: Negative, NaN or infinite time, or unknown style.

    Example:
        >>> format_timestamp(3.25), format_timestamp(3725.5, "hms")
        ('<3.2 seconds>', '<01:02:05.5>')
    """
    if not math.isfinite(seconds):
        raise ValueError(f"timestamps must be finite, got {seconds}")
    if seconds < 0:
        raise ValueError(f"timestamps must not be negative, got {seconds}")
    if style == "seconds":
        return f"<{seconds:.1f} seconds>"
    if style == "hms":
        tenths = round(seconds * 10)
        hours, rest = divmod(tenths, 36000)
        minutes, rest = divmod(rest, 600)
        return f"<{hours:02d}:{minutes:02d}:{rest / 10:04.1f}>"
    raise ValueError(f"timestamp style must be 'seconds' or 'hms', got {style!r}")
