"""Processors on hostile or unusual input: every Pillow mode, transparency, truncated files, fps, NaN, frame lists."""

from __future__ import annotations

import io
import math

import numpy as np
import PIL.Image
import pytest
import torch

from vl_vision.processing import ImageProcessor, VideoProcessor, format_timestamp, patch_times, to_rgb_image
from vl_vision.processing.timestamps import sample_frame_indices

SMALL = {"min_pixels": 32 * 32, "max_pixels": 64 * 64, "num_threads": 1}
VIDEO = {"min_pixels": 32 * 32 * 2, "max_pixels": 64 * 64 * 8, "num_threads": 1}


def _rgb(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(to_rgb_image(image))


def _grey(value: int, mode: str) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.full((6, 5), value, np.uint8)).convert(mode)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_thirty_two_bit_grey_from_eight_bit_keeps_its_brightness(mode: str) -> None:
    # convert("I") / convert("F") of an 8-bit picture holds 0..255: it used to come out near black ("I")
    assert (_rgb(_grey(200, mode)) == 200).all()


def test_documented_ranges_of_i_f_and_sixteen_bit_modes() -> None:
    unit = PIL.Image.fromarray(np.full((4, 4), 0.5, np.float32))
    assert (_rgb(unit) == 128).all()  # F in [0, 1]: the float convention, like float arrays
    for mode_array in (np.full((4, 4), 51400, np.int32), np.full((4, 4), 51400.0, np.float32)):
        assert (_rgb(PIL.Image.fromarray(mode_array)) == 200).all()  # 16-bit data in I / F: / 257
    sixteen = PIL.Image.fromarray(np.full((4, 4), 200, np.uint16))
    assert sixteen.mode == "I;16" and (_rgb(sixteen) == 1).all()  # I;16 is 16-bit whatever its values
    assert (np.asarray(to_rgb_image(sixteen, high_bit_depth="clip")) == 200).all()
    for mode, dtype in (("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2")):
        image = PIL.Image.frombytes(mode, (4, 4), np.full((4, 4), 51400, dtype).tobytes())
        assert image.mode == mode and (_rgb(image) == 200).all()


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        (np.full((4, 4), np.nan, np.float32), "NaN or infinite"),
        (np.full((4, 4), np.inf, np.float32), "NaN or infinite"),
        (np.full((4, 4), -1.0, np.float32), r"must lie in \[0, 65535\]"),
        (np.full((4, 4), 70_000, np.int32), r"must lie in \[0, 65535\]"),
    ],
)
def test_out_of_range_i_and_f_pictures_are_named_errors(values: np.ndarray, needle: str) -> None:
    with pytest.raises(ValueError, match=rf"image 0: mode [IF] .*{needle}"):
        ImageProcessor(**SMALL)([PIL.Image.fromarray(values)])


@pytest.mark.parametrize("mode", ["RGBA", "RGBa", "LA", "La", "PA"])
def test_fully_transparent_is_white_for_every_alpha_mode(mode: str) -> None:
    bands = len(mode)
    assert (_rgb(PIL.Image.new(mode, (5, 4), (0,) * bands)) == 255).all()


def test_half_transparent_premultiplied_matches_straight_alpha() -> None:
    straight = _rgb(PIL.Image.new("RGBA", (4, 4), (100, 60, 20, 128)))
    premultiplied = _rgb(PIL.Image.new("RGBa", (4, 4), (50, 30, 10, 128)))
    assert np.abs(straight.astype(int) - premultiplied.astype(int)).max() <= 2
    assert np.abs(_rgb(PIL.Image.new("La", (4, 4), (50, 128))).astype(int) - 177).max() <= 1


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "I", "I;16", "F"])
def test_transparency_keys_are_white(mode: str) -> None:
    image = _grey(0, "L").convert(mode)
    key = (0, 0, 0) if mode == "RGB" else 0
    image.info["transparency"] = key
    assert (_rgb(image) == 255).all()
    del image.info["transparency"]
    assert (_rgb(image) == 0).all()


def test_every_pillow_mode_converts_like_pillow() -> None:
    rng = np.random.default_rng(0)
    base = PIL.Image.fromarray(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8))
    for mode in ("CMYK", "YCbCr", "HSV", "LAB", "RGBX", "P", "1", "L"):
        image = base.convert(mode) if mode not in ("HSV", "LAB") else base.convert("RGB").convert(mode)
        want = np.asarray(image.convert("RGB"))
        assert np.array_equal(_rgb(image), want), mode  # LAB's "A" band is colour, not alpha


def test_truncated_files_are_value_errors_naming_the_image(tmp_path: object) -> None:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (40, 30), (9, 9, 9)).save(buffer, format="PNG")
    png = buffer.getvalue()
    for data in (b"\x89PNG\r\n\x1a\n" + b"junk" * 10, png[: len(png) // 2], png[:20]):
        with pytest.raises(ValueError, match="image 1"):
            ImageProcessor(**SMALL)([PIL.Image.new("RGB", (32, 32)), data])
    lazy = PIL.Image.open(io.BytesIO(png[: len(png) - 30]))  # opened lazily: truncation shows on decode
    with pytest.raises(ValueError, match=r"image 0: .*truncated or corrupt"):
        ImageProcessor(**SMALL)([lazy])


@pytest.mark.parametrize("bad", ["30", float("nan"), float("inf"), -2.0, 0, True, [30.0]])
def test_bad_video_fps_is_rejected_by_name(bad: object) -> None:
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"video 0: video_fps must be"):
        VideoProcessor(**VIDEO)(frames, video_fps=bad if not isinstance(bad, list) else [bad])  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "2", -1.0])
def test_bad_sampling_fps_is_rejected_by_name(bad: object) -> None:
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"^fps must be"):
        VideoProcessor(**VIDEO)(frames, video_fps=2.0, fps=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^fps must be"):
        VideoProcessor(fps=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^video_fps must be"):
        sample_frame_indices(10, video_fps=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^video_fps must be"):
        patch_times([0, 1], bad)  # type: ignore[arg-type]


def test_timestamps_are_never_nan() -> None:
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="must be finite"):
            format_timestamp(bad)


def test_a_list_of_numpy_frames_is_one_video() -> None:
    rng = np.random.default_rng(1)
    clip = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    proc = VideoProcessor(**VIDEO)
    whole = proc(clip, video_fps=2.0)
    for frames in (
        [f for f in clip],
        [torch.from_numpy(f).permute(2, 0, 1) for f in clip],
        [PIL.Image.fromarray(f) for f in clip],
    ):
        got = proc(frames, video_fps=2.0)
        assert got["video_grid_thw"].tolist() == whole["video_grid_thw"].tolist()
        assert torch.equal(got["pixel_values_videos"], whole["pixel_values_videos"])
    batch = proc([clip, clip[:2]], video_fps=[2.0, 2.0])  # 4-D arrays in a list: a batch
    assert batch["video_grid_thw"].shape[0] == 2
    grey = proc([f[:, :, 0] for f in clip], video_fps=2.0)  # 2-D frames too
    assert grey["video_grid_thw"].tolist() == whole["video_grid_thw"].tolist()


def test_nan_pixels_never_reach_the_output() -> None:
    frames = np.random.default_rng(2).random((4, 32, 32, 3)).astype(np.float32)
    frames[1, 3, 4, 0] = np.nan
    with pytest.raises(ValueError, match=r"video 0 frame 1: float images must have values in \[0, 1\]"):
        VideoProcessor(**VIDEO)(frames, video_fps=2.0)
    image = torch.rand(3, 32, 32)
    image[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="image 0: float images"):
        ImageProcessor(**SMALL)([image])
    for mean, std in (((0.5, float("nan"), 0.5), (0.5, 0.5, 0.5)), ((0.5, 0.5, 0.5), (0.5, float("inf"), 0.5))):
        with pytest.raises(ValueError, match=r"must be .*finite"):
            ImageProcessor(image_mean=mean, image_std=std)
        with pytest.raises(ValueError, match=r"must be .*finite"):
            VideoProcessor(image_mean=mean, image_std=std)


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: ImageProcessor(**SMALL)([]), "no images given"),
        (lambda: ImageProcessor(**SMALL)(()), "no images given"),
        (lambda: VideoProcessor(**VIDEO)([]), "no videos given"),
        (lambda: VideoProcessor(**VIDEO)([[]], video_fps=2.0), "video 0: a video needs at least 1 frame"),
        (lambda: VideoProcessor(**VIDEO)(np.zeros((0, 32, 32, 3), np.uint8), video_fps=2.0), "at least 1 frame"),
    ],
)
def test_empty_batches_are_clear_errors(call: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        call()  # type: ignore[operator]
