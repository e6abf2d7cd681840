"""Reading sampled frames of a video file with PyAV (an optional dependency: ``pip install vl-vision[video]``).

Implements the decoding step in front of Qwen3-VL's fps-based frame sampling (Qwen3-VL technical
report, arXiv 2511.21631, section 2; REFERENCE.md section 2): the frame count and frame rate come
from the container, the indices to keep are chosen by the caller, and only those frames are
converted to RGB.

Notation: ``F`` total frames; ``n`` kept frames; frames are ``uint8 [n, H, W, 3]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _import_av() -> Any:
    try:
        import av
    except ImportError as exc:  # pragma: no cover - exercised only without PyAV
        raise ImportError(
            "reading video files needs PyAV: `pip install av` (or `pip install vl-vision[video]`); "
            "alternatively pass the frames as an array or a list of images"
        ) from exc
    return av


def read_video(
    path: str | os.PathLike[str], choose: Callable[[int, float], np.ndarray]
) -> tuple[np.ndarray, np.ndarray, float]:
    """Decode the frames of a video file that ``choose`` selects.

    Args:
        path: The video file.
        choose: ``choose(total_frames, video_fps) -> indices`` picks the frames to keep (sorted).

    Returns:
        ``(frames uint8 [n, H, W, 3], indices int64 [n], video_fps)``.

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: The file has no video stream, no decodable frames, or is not a video.
    """
    av = _import_av()
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"video: no such file {str(file)!r}")
    try:
        with av.open(str(file)) as container:
            if not container.streams.video:
                raise ValueError(f"video {str(file)!r} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            video_fps = float(rate) if rate else 24.0
            declared = int(stream.frames)
            if declared > 0:
                indices = np.asarray(choose(declared, video_fps), dtype=np.int64)
                frames = _decode_selected(container.decode(stream), indices.tolist())
                if frames is not None:
                    return frames, indices, video_fps
        # No frame count in the header, or the header over-counted: decode everything, then choose.
        with av.open(str(file)) as container:
            stream = container.streams.video[0]
            everything = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except av.error.FFmpegError as exc:
        raise ValueError(f"video {str(file)!r} is not a readable video file: {exc}") from exc
    if not everything:
        raise ValueError(f"video {str(file)!r} has no decodable frames")
    indices = np.asarray(choose(len(everything), video_fps), dtype=np.int64)
    return np.stack([everything[i] for i in indices.tolist()]), indices, video_fps


def _decode_selected(decoded: Any, wanted: list[int]) -> np.ndarray | None:
    """Frames at the sorted indices ``wanted`` (repeats allowed), or None when the stream ends early."""
    frames: list[np.ndarray] = []
    position = 0
    for index, frame in enumerate(decoded):
        if position < len(wanted) and wanted[position] == index:
            array = frame.to_ndarray(format="rgb24")
            while position < len(wanted) and wanted[position] == index:
                frames.append(array)
                position += 1
        if position == len(wanted):
            return np.stack(frames)
    return None
