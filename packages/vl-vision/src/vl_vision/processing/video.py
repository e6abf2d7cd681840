"""Torchvision-free video processor of the Qwen3-VL family: fps sampling, pixel budgets, timestamps.

Implements Qwen3-VL's video input (Qwen3-VL technical report, arXiv 2511.21631, section 2;
REFERENCE.md sections 1 and 2): frames are sampled at ``fps`` (clamped to ``[min_frames,
max_frames]``), all frames of a clip are resized to one size chosen by :func:`smart_resize_video`
under a total pixel budget (optionally capped per frame, as qwen-vl-utils does), padded to a
multiple of the temporal patch size by repeating the last frame, normalised and flattened into
merge-block-ordered patch rows; every temporal patch gets its ``<t seconds>`` text.

Sampling, budgets, grid and row layout follow transformers' ``Qwen3VLVideoProcessor`` (whose
pipeline needs torchvision); frames are resized with Pillow's bicubic filter, like the images.

Notation: ``n`` sampled frames; ``T`` temporal patch size; ``P`` patch size; ``m`` merge size;
grid ``(t, h, w)`` = ``(ceil(n / T), H / P, W / P)``; ``N`` patch rows of all videos.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeAlias, TypedDict

import numpy as np
import PIL.Image
import torch

from ._inputs import HighBitDepth, array_to_rgb, to_rgb_image
from ._patchify import normalization, patchify_into
from ._resize import smart_resize_video
from ._video_io import read_video
from .image import default_num_threads
from .timestamps import TimestampStyle, check_rate, format_timestamp, pad_indices, patch_times, sample_frame_indices

__all__ = ["VideoBatch", "VideoInput", "VideoProcessor"]

VideoInput: TypeAlias = (
    "np.ndarray | torch.Tensor | Sequence[PIL.Image.Image | np.ndarray | torch.Tensor] | str | os.PathLike[str]"
)
"""One video: ``[F, H, W, C]`` array, ``[F, C, H, W]`` tensor, a list of frames, or a video file path."""

DEFAULT_VIDEO_FPS = 24.0
"""Frame rate assumed for frame arrays given without ``video_fps`` (transformers does the same)."""


def _is_frame(item: object) -> bool:
    """A single picture: a PIL image, or a 2-D / 3-D array or tensor (a 4-D one is a whole video)."""
    return isinstance(item, PIL.Image.Image) or (isinstance(item, np.ndarray | torch.Tensor) and item.ndim in (2, 3))


class VideoBatch(TypedDict):
    """Output of :class:`VideoProcessor`.

    Attributes:
        pixel_values_videos: float32 ``[N, C * T * P * P]`` patch rows of all videos, video after video.
        video_grid_thw: int64 ``[n, 3]`` patch grid ``(t, h, w)`` of each video.
        timestamps: For each video, the text of each temporal patch (``"<1.2 seconds>"``).
        timestamp_seconds: For each video, the time of each temporal patch in seconds.
        frame_indices: For each video, the source index of each frame used (after padding).
    """

    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    timestamps: list[list[str]]
    timestamp_seconds: list[list[float]]
    frame_indices: list[list[int]]


class VideoProcessor:
    """Turn videos into Qwen3-VL vision-encoder input plus the timestamp text of each temporal patch.

    Args:
        patch_size: ``P`` (16 for Qwen3-VL).
        temporal_patch_size: ``T``, frames per temporal patch.
        merge_size: ``m``; frame sides are multiples of ``P * m``.
        min_pixels: Smallest total pixel count over all frames of a clip (transformers'
            ``size["shortest_edge"]``, 128 x 32 x 32).
        max_pixels: Largest total pixel count over all frames (``size["longest_edge"]``, 768 x 32 x 32).
        image_mean: Per-channel mean on the ``[0, 1]`` scale.
        image_std: Per-channel standard deviation.
        fps: Frames sampled per second of video.
        min_frames: Fewest sampled frames (unless the clip is shorter).
        max_frames: Most sampled frames.
        max_frame_tokens: Per-frame cap in merged tokens (qwen-vl-utils' ``VIDEO_MAX_TOKEN_NUM``, 768):
            each frame gets ``max(min(cap * (P*m)**2, max_pixels // n), int(1.05 * min_pixels))``
            pixels, so short clips do not spend the whole budget on a few frames. ``None`` turns the
            cap off (transformers' ``cap_pixels_per_frame=False``).
        timestamp_style: ``"seconds"`` (``<3.5 seconds>``) or ``"hms"`` (``<00:00:03.5>``).
        high_bit_depth: How 16-bit frames become 8-bit (see :class:`ImageProcessor`).
        num_threads: Worker threads for resizing and patchifying frames.
    """

    def __init__(
        self,
        patch_size: int = 16,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        min_pixels: int = 128 * 32 * 32,
        max_pixels: int = 768 * 32 * 32,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        *,
        fps: float = 2.0,
        min_frames: int = 4,
        max_frames: int = 768,
        max_frame_tokens: int | None = 768,
        timestamp_style: TimestampStyle = "seconds",
        high_bit_depth: HighBitDepth = "scale",
        num_threads: int | None = None,
    ) -> None:
        if min(patch_size, temporal_patch_size, merge_size) < 1:
            raise ValueError(
                f"patch_size ({patch_size}), temporal_patch_size ({temporal_patch_size}) and merge_size "
                f"({merge_size}) must be positive"
            )
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
        if min_frames > max_frames:
            raise ValueError(f"min_frames ({min_frames}) is larger than max_frames ({max_frames})")
        fps = check_rate(fps, "fps")
        format_timestamp(0.0, timestamp_style)  # validates the style
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.fps, self.min_frames, self.max_frames = fps, min_frames, max_frames
        self.max_frame_tokens = max_frame_tokens
        self.timestamp_style: TimestampStyle = timestamp_style
        self.high_bit_depth: HighBitDepth = high_bit_depth
        self.num_threads = default_num_threads() if num_threads is None else max(1, num_threads)
        self._scale, self._bias = normalization(self.image_mean, self.image_std)

    @property
    def factor(self) -> int:
        """Side multiple of every resized frame: ``patch_size * merge_size``."""
        return self.patch_size * self.merge_size

    def sample_indices(
        self, total_frames: int, video_fps: float, *, fps: float | None = None, num_frames: int | None = None
    ) -> np.ndarray:
        """Frame indices to keep (see :func:`sample_frame_indices`), with this processor's defaults."""
        if fps is not None and num_frames is not None:
            raise ValueError(f"give either fps ({fps}) or num_frames ({num_frames}), not both")
        return sample_frame_indices(
            total_frames,
            video_fps=video_fps,
            fps=self.fps if fps is None else fps,
            num_frames=num_frames,
            min_frames=self.min_frames,
            max_frames=self.max_frames,
        )

    def clip_max_pixels(self, num_frames: int) -> int:
        """Total pixel budget of a clip of ``num_frames`` sampled frames (the per-frame cap applied)."""
        if self.max_frame_tokens is None:
            return self.max_pixels
        frame_cap = self.max_frame_tokens * self.factor**2
        per_frame = max(min(frame_cap, self.max_pixels // num_frames), int(self.min_pixels * 1.05))
        return per_frame * num_frames

    def target_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """Resized frame ``(height, width)`` of a clip of ``num_frames`` frames of ``height x width``."""
        return smart_resize_video(
            num_frames,
            height,
            width,
            factor=self.factor,
            temporal_factor=self.temporal_patch_size,
            min_pixels=self.min_pixels,
            max_pixels=self.clip_max_pixels(num_frames),
        )

    def _frames(
        self,
        video: VideoInput,
        video_fps: float | None,
        fps: float | None,
        num_frames: int | None,
        sample: bool,
        name: str,
    ) -> tuple[np.ndarray, list[int], float]:
        """``(uint8 frames [n, H, W, 3], source indices, video_fps)`` of one video."""
        if isinstance(video, str | os.PathLike):

            def choose(total: int, rate: float) -> np.ndarray:
                if not sample:
                    return np.arange(total, dtype=np.int64)
                return self.sample_indices(total, rate, fps=fps, num_frames=num_frames)

            frames, indices, rate = read_video(video, choose)
            return frames, indices.tolist(), float(video_fps or rate)
        if video_fps is None:
            warnings.warn(
                f"{name}: no video_fps given for a frame array; assuming {DEFAULT_VIDEO_FPS} fps for sampling "
                "and timestamps",
                UserWarning,
                stacklevel=3,
            )
            video_fps = DEFAULT_VIDEO_FPS
        stacked = self._stack(video, name)
        total = stacked.shape[0]
        chosen = self.sample_indices(total, video_fps, fps=fps, num_frames=num_frames) if sample else np.arange(total)
        return stacked[chosen], chosen.tolist(), float(video_fps)

    def _stack(self, video: VideoInput, name: str) -> np.ndarray:
        if isinstance(video, np.ndarray | torch.Tensor):
            if video.ndim != 4:
                raise ValueError(
                    f"{name}: expected frames of 4 dimensions ([F, H, W, C] array or [F, C, H, W] tensor), got "
                    f"{video.ndim} (shape {tuple(video.shape)})"
                )
            if len(video) == 0:
                raise ValueError(f"{name}: a video needs at least 1 frame, got 0")
            if isinstance(video, np.ndarray) and video.dtype == np.uint8 and video.shape[-1] == 3:
                return video
            frames = [
                array_to_rgb(f, high_bit_depth=self.high_bit_depth, name=f"{name} frame {i}")
                for i, f in enumerate(video)
            ]
        elif isinstance(video, Sequence) and not isinstance(video, str | bytes):
            if len(video) == 0:
                raise ValueError(f"{name}: a video needs at least 1 frame, got 0")
            frames = [
                np.asarray(to_rgb_image(f, high_bit_depth=self.high_bit_depth, name=f"{name} frame {i}"))
                for i, f in enumerate(video)
            ]
        else:
            raise TypeError(f"{name}: unsupported video type {type(video).__name__}")
        sizes = {f.shape for f in frames}
        if len(sizes) > 1:
            raise ValueError(f"{name}: all frames must have one size, got {sorted(sizes)}")
        return np.stack(frames)

    def _resize(self, frames: np.ndarray, pool: ThreadPoolExecutor | None) -> np.ndarray:
        count, height, width, _ = frames.shape
        new_h, new_w = self.target_size(count, height, width)
        if (new_h, new_w) == (height, width):
            return frames
        resize = lambda f: np.asarray(PIL.Image.fromarray(f).resize((new_w, new_h), PIL.Image.Resampling.BICUBIC))
        return np.stack(list(pool.map(resize, frames)) if pool is not None else [resize(f) for f in frames])

    def __call__(
        self,
        videos: VideoInput | Sequence[VideoInput],
        video_fps: float | Sequence[float | None] | None = None,
        *,
        fps: float | None = None,
        num_frames: int | None = None,
        do_sample_frames: bool = True,
    ) -> VideoBatch:
        """Process one video or a batch.

        Args:
            videos: One video or a list of videos. A video is a ``uint8 [F, H, W, C]`` numpy array, an
                ``[F, C, H, W]`` tensor, a list of frames (PIL images, ``[H, W, C]`` / ``[H, W]``
                arrays, ``[C, H, W]`` tensors) or a path to a video file (needs PyAV). A list whose
                items are all single frames (PIL images, 2-D or 3-D arrays and tensors) is read as
                one video; a list holding 4-D arrays, lists or paths is a batch of videos.
            video_fps: Frame rate of the source video(s), one value or one per video (positive
                finite numbers). Files use their own rate when this is None; arrays then assume 24
                fps (with a warning).
            fps: Target sampling rate for this call (default: the processor's ``fps``).
            num_frames: Sample exactly this many frames instead of using a rate.
            do_sample_frames: False keeps every given frame (already sampled by the caller).

        Returns:
            A :class:`VideoBatch` with patch rows, grids, timestamp texts and times, and frame indices.

        Raises:
            ValueError: Empty video, frames of different sizes, wrong channel count, aspect ratio
                above 200, unreadable file, fps and num_frames both given, or an fps / video_fps
                that is not a positive finite number (``"30"``, NaN; named in the message).
        """
        batch = self._as_batch(videos)
        if fps is not None:
            fps = check_rate(fps, "fps")
        if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int | np.integer)):
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        if isinstance(video_fps, np.ndarray):
            video_fps = video_fps.tolist()
        many = isinstance(video_fps, Sequence) and not isinstance(video_fps, str | bytes)
        rates = list(video_fps) if many else [video_fps] * len(batch)  # type: ignore[arg-type]
        if len(rates) != len(batch):
            raise ValueError(f"got {len(rates)} video_fps values for {len(batch)} videos")
        rates = [None if r is None else check_rate(r, f"video {i}: video_fps") for i, r in enumerate(rates)]
        workers = self.num_threads
        pool = ThreadPoolExecutor(workers) if workers > 1 else None
        try:
            clips, grids, stamps, seconds, used = [], [], [], [], []
            for i, (video, rate) in enumerate(zip(batch, rates)):
                frames, indices, rate_used = self._frames(video, rate, fps, num_frames, do_sample_frames, f"video {i}")
                frames = self._resize(frames, pool)
                pad = -len(frames) % self.temporal_patch_size
                if pad:
                    frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
                times = patch_times(indices, rate_used, self.temporal_patch_size)
                clips.append(frames)
                grids.append(
                    (
                        len(frames) // self.temporal_patch_size,
                        frames.shape[1] // self.patch_size,
                        frames.shape[2] // self.patch_size,
                    )
                )
                seconds.append(times)
                stamps.append([format_timestamp(t, self.timestamp_style) for t in times])
                used.append(pad_indices(indices, self.temporal_patch_size))
            pixel_values = self._patchify(clips, grids, pool)
        finally:
            if pool is not None:
                pool.shutdown()
        return {
            "pixel_values_videos": pixel_values,
            "video_grid_thw": torch.tensor(grids, dtype=torch.int64),
            "timestamps": stamps,
            "timestamp_seconds": seconds,
            "frame_indices": used,
        }

    @staticmethod
    def _as_batch(videos: VideoInput | Sequence[VideoInput]) -> list[VideoInput]:
        if isinstance(videos, str | os.PathLike | np.ndarray | torch.Tensor):
            return [videos]
        if isinstance(videos, Sequence):
            if len(videos) == 0:
                raise ValueError("no videos given: expected at least one video")
            if all(_is_frame(v) for v in videos):
                return [videos]  # type: ignore[list-item]  # a list of frames is one video
            return list(videos)  # type: ignore[arg-type]
        raise TypeError(f"unsupported videos type {type(videos).__name__}")

    def _patchify(
        self, clips: list[np.ndarray], grids: list[tuple[int, int, int]], pool: ThreadPoolExecutor | None
    ) -> torch.Tensor:
        T = self.temporal_patch_size
        # one job per temporal patch, so a single long video also spreads over the threads
        jobs = [(c, k) for c, (t, _, _) in enumerate(grids) for k in range(t)]
        per_patch = [h * w for _, h, w in grids]
        starts = np.cumsum([0] + [t * h * w for t, h, w in grids]).tolist()
        out = torch.empty(starts[-1], 3 * T * self.patch_size**2, dtype=torch.float32)
        rows = out.numpy()

        def write(job: tuple[int, int]) -> None:
            c, k = job
            first = starts[c] + k * per_patch[c]
            patchify_into(
                rows[first : first + per_patch[c]],
                clips[c][k * T : (k + 1) * T],
                self._scale,
                self._bias,
                patch_size=self.patch_size,
                temporal_patch_size=T,
                merge_size=self.merge_size,
            )

        if pool is None:
            for job in jobs:
                write(job)
        else:
            list(pool.map(write, jobs))
        return out
