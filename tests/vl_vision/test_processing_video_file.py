"""Reading video files with PyAV (optional): frame count and rate from the container, sampled frames, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vl_vision.processing import VideoProcessor

av = pytest.importorskip("av")


def _write(path: Path, frames: np.ndarray, fps: int, codec: str) -> None:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = {"ffv1": "bgr0", "png": "rgb24"}.get(codec, "yuv420p")
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _frames(count: int, h: int = 48, w: int = 64) -> np.ndarray:
    # smooth gradients with a moving offset: every frame differs, codecs keep them well
    y, x = np.mgrid[0:h, 0:w]
    return np.stack(
        [np.stack([(x * 3 + 7 * i) % 256, (y * 4 + 5 * i) % 256, ((x + y) * 2) % 256], -1) for i in range(count)]
    ).astype(np.uint8)


@pytest.mark.parametrize(("suffix", "codec"), [(".mkv", "ffv1"), (".avi", "png")])
def test_lossless_file_equals_the_array_it_was_written_from(tmp_path: Path, suffix: str, codec: str) -> None:
    frames = _frames(30)
    path = tmp_path / f"clip{suffix}"
    _write(path, frames, fps=10, codec=codec)
    proc = VideoProcessor(min_pixels=32 * 32, max_pixels=32 * 32 * 32, num_threads=1)
    from_file = proc(path)
    from_array = proc(frames, video_fps=10.0)
    assert from_file["frame_indices"] == from_array["frame_indices"]  # 3 s at 2 fps -> 6 frames
    assert len(from_file["frame_indices"][0]) == 6
    assert from_file["timestamps"] == from_array["timestamps"]
    assert torch.equal(from_file["pixel_values_videos"], from_array["pixel_values_videos"])


def test_lossy_file_close_to_its_source(tmp_path: Path) -> None:
    frames = _frames(20)
    path = tmp_path / "clip.mp4"
    _write(path, frames, fps=5, codec="mpeg4")
    proc = VideoProcessor(min_pixels=32 * 32, max_pixels=32 * 32 * 32)
    from_file, from_array = proc(str(path)), proc(frames, video_fps=5.0)
    assert from_file["frame_indices"] == from_array["frame_indices"]
    assert torch.equal(from_file["video_grid_thw"], from_array["video_grid_thw"])
    # yuv420 + mpeg4 quantisation: mean error small on the normalised [-1, 1] scale
    assert (from_file["pixel_values_videos"] - from_array["pixel_values_videos"]).abs().mean().item() < 0.1


def test_video_fps_argument_overrides_the_container_rate(tmp_path: Path) -> None:
    path = tmp_path / "clip.mkv"
    _write(path, _frames(20), fps=10, codec="ffv1")
    out = VideoProcessor(min_pixels=32 * 32, max_pixels=32 * 32 * 32)(path, video_fps=20.0)
    assert len(out["frame_indices"][0]) == 4  # 1 s at 2 fps -> 2, raised to min_frames 4
    assert out["timestamp_seconds"][0][0] == pytest.approx((0 + 6) / 2 / 20.0)


def test_bad_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_bytes(b"definitely not a video container")
    with pytest.raises(ValueError, match=r"notes\.mp4.* is not a readable video file"):
        VideoProcessor()(text)
    with pytest.raises(FileNotFoundError, match="no such file"):
        VideoProcessor()(tmp_path / "missing.mp4")
