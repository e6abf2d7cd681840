"""Property-based tests of the processors: any array, mode, bytes or rate gives finite output or a ValueError.

Outputs are checked to be finite and inside the normalised range ``[-1, 1]`` (mean = std = 0.5), so a
NaN pixel or a wrong value range can never reach the model silently; each call has a time budget.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
import PIL.Image
import torch
from _budget import PROPERTY, within_budget
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vl_vision.processing import ImageProcessor, VideoProcessor, open_image, sample_frame_indices

IMAGES = ImageProcessor(min_pixels=16 * 16, max_pixels=48 * 48, patch_size=8, num_threads=1)
VIDEOS = VideoProcessor(min_pixels=16 * 16 * 2, max_pixels=48 * 48 * 4, patch_size=8, num_threads=1, max_frames=8)
MODES = ["1", "L", "P", "RGB", "RGBA", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr", "HSV", "LAB", "RGBX"]
MODES += ["I", "F", "I;16", "I;16B", "I;16L", "I;16N"]


def _in_range(pixels: torch.Tensor) -> bool:
    return bool(torch.isfinite(pixels).all()) and float(pixels.abs().max()) <= 1.0 + 1e-6


ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.int64, np.float32, np.float64, np.bool_, np.float16]),
    shape=st.sampled_from([(4, 5), (6, 4, 1), (5, 6, 3), (3, 7, 4), (3, 5, 6), (1, 1), (0, 4, 3), (2, 3, 4, 3), (9,)]),
    elements=None,
)


@PROPERTY
@given(array=ARRAYS, as_tensor=st.booleans())
def test_any_array_is_an_in_range_image_or_a_value_error(array: np.ndarray, as_tensor: bool) -> None:
    image: Any = torch.from_numpy(array.copy()) if as_tensor and array.dtype != np.uint16 else array
    try:
        out = within_budget(IMAGES, [image])
    except ValueError as exc:
        assert "image 0" in str(exc)
        return
    assert _in_range(out["pixel_values"]) and out["image_grid_thw"].shape == (1, 3)


@PROPERTY
@given(mode=st.sampled_from(MODES), seed=st.integers(0, 2**16), size=st.tuples(st.integers(2, 40), st.integers(2, 40)))
def test_every_pillow_mode_gives_in_range_pixels(mode: str, seed: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(seed)
    base = PIL.Image.fromarray(rng.integers(0, 256, (*size[::-1], 4), dtype=np.uint8), mode="RGBA")
    if mode in ("I", "F", "I;16", "I;16B", "I;16L", "I;16N"):
        scale = {"I": 255, "F": float(rng.choice([1.0, 255.0, 65535.0]))}.get(mode, 65535)
        values = rng.random(size[::-1]) * scale
        dtype = {"I": np.int32, "F": np.float32, "I;16": np.uint16, "I;16L": "<u2", "I;16N": "=u2", "I;16B": ">u2"}[
            mode
        ]
        image = PIL.Image.frombytes(mode, size, values.astype(dtype).tobytes())
    elif mode in ("RGBa", "La"):
        image = PIL.Image.frombytes(mode, size, base.convert("RGBA" if mode == "RGBa" else "LA").tobytes())
    else:
        image = base.convert(mode) if mode not in ("HSV", "LAB") else base.convert("RGB").convert(mode)
    if rng.random() < 0.3 and mode in ("1", "L", "P", "I", "I;16"):
        image.info["transparency"] = int(np.asarray(image).flat[0])
    out = within_budget(IMAGES, [image])
    assert _in_range(out["pixel_values"]), mode


@PROPERTY
@given(
    data=st.binary(max_size=200), header=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM"])
)
def test_any_bytes_decode_or_raise_a_value_error(data: bytes, header: bytes) -> None:
    try:
        image = within_budget(open_image, header + data, name="blob")
    except ValueError as exc:
        assert str(exc).startswith("blob")
        return
    assert image.width >= 1 and image.height >= 1


@PROPERTY
@given(cut=st.integers(0, 400), fmt=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP"]))
def test_truncated_files_raise_value_errors(cut: int, fmt: str) -> None:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.arange(30 * 20 * 3, dtype=np.uint8).reshape(20, 30, 3)).save(buffer, format=fmt)
    data = buffer.getvalue()[:cut]
    try:
        out = within_budget(IMAGES, [data])
    except ValueError as exc:
        assert "image 0" in str(exc)
        return
    assert _in_range(out["pixel_values"])


RATES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-5, 120),
    st.text(max_size=3),
    st.none(),
    st.booleans(),
)


@PROPERTY
@given(video_fps=RATES, fps=RATES, frames=st.integers(1, 12))
def test_any_rate_gives_finite_timestamps_or_a_named_error(video_fps: Any, fps: Any, frames: int) -> None:
    clip = np.random.default_rng(frames).integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # no video_fps: 24 fps assumed, with a warning
            out = within_budget(VIDEOS, clip, video_fps=video_fps, fps=fps)
    except ValueError as exc:
        assert "fps" in str(exc)
        return
    seconds = out["timestamp_seconds"][0]
    assert all(math.isfinite(t) and t >= 0 for t in seconds) and seconds == sorted(seconds)
    assert all("nan" not in s and "inf" not in s for s in out["timestamps"][0])
    assert _in_range(out["pixel_values_videos"])


@PROPERTY
@given(total=st.integers(1, 5000), video_fps=st.floats(0.01, 240), fps=st.floats(0.01, 60), lo=st.integers(1, 10))
def test_sampled_indices_are_sorted_in_range_and_keep_both_ends(
    total: int, video_fps: float, fps: float, lo: int
) -> None:
    idx = sample_frame_indices(total, video_fps=video_fps, fps=fps, min_frames=lo, max_frames=64)
    assert 1 <= len(idx) <= min(total, max(lo, 64))
    assert idx[0] == 0 and bool((np.diff(idx) >= 0).all())
    assert idx[-1] == (total - 1 if len(idx) > 1 else 0)
