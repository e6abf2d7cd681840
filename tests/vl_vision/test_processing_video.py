"""VideoProcessor: fps sampling, clamps, budgets, padding, timestamps and row layout against transformers' Qwen3-VL pieces.

transformers' ``Qwen3VLVideoProcessor`` pipeline needs torchvision, so its pure pieces are used as
oracles: ``sample_frames`` (called with a stand-in ``self``), the video ``smart_resize`` and
``get_num_of_video_patches``, ``patchify`` (pure torch) and ``Qwen3VLProcessor._calculate_timestamps``.
"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from vl_vision.processing import VideoProcessor, format_timestamp, patch_times, sample_frame_indices


def _qwen3_video() -> Any:
    return pytest.importorskip("transformers.models.qwen3_vl.video_processing_qwen3_vl")


def _video(frames: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def test_sampling_matches_transformers() -> None:
    module = _qwen3_video()
    metadata_cls = pytest.importorskip("transformers.video_utils").VideoMetadata
    rng = random.Random(0)
    for _ in range(300):
        total, video_fps = rng.randint(1, 3000), rng.choice([1.0, 7.5, 23.976, 24.0, 30.0, 60.0])
        fps, lo, hi = rng.choice([0.5, 1.0, 2.0, 4.0]), rng.choice([1, 4, 8]), rng.choice([16, 64, 768])
        fake = SimpleNamespace(fps=fps, min_frames=lo, max_frames=hi)
        meta = metadata_cls(total_num_frames=total, fps=video_fps)
        want = module.Qwen3VLVideoProcessor.sample_frames(fake, meta, fps=fps)
        got = sample_frame_indices(total, video_fps=video_fps, fps=fps, min_frames=lo, max_frames=hi)
        np.testing.assert_array_equal(got, want)
        want_n = module.Qwen3VLVideoProcessor.sample_frames(fake, meta, num_frames=min(total, 9))
        np.testing.assert_array_equal(sample_frame_indices(total, video_fps=video_fps, num_frames=9), want_n)


def test_sampling_formula_and_clamps() -> None:
    # 10 s at 30 fps, 2 fps -> 20 frames spread over 0..299, first and last kept
    idx = sample_frame_indices(300, video_fps=30.0, fps=2.0)
    assert len(idx) == 20 and idx[0] == 0 and idx[-1] == 299
    np.testing.assert_array_equal(idx, np.round(np.linspace(0, 299, 20)).astype(np.int64))
    assert len(sample_frame_indices(30, video_fps=30.0, fps=2.0)) == 4  # 2 frames -> min_frames 4
    assert len(sample_frame_indices(3, video_fps=30.0, fps=2.0)) == 3  # ... but never more than the clip has
    assert len(sample_frame_indices(100_000, video_fps=30.0, fps=2.0, max_frames=768)) == 768
    with pytest.raises(ValueError, match=r"min_frames \(9\) is larger than max_frames \(8\)"):
        sample_frame_indices(10, video_fps=1.0, min_frames=9, max_frames=8)
    with pytest.raises(ValueError, match="video_fps must be positive, got 0"):
        sample_frame_indices(10, video_fps=0)
    with pytest.raises(ValueError, match=r"give either fps \(1.0\) or num_frames \(3\), not both"):
        VideoProcessor().sample_indices(10, 1.0, fps=1.0, num_frames=3)


def test_timestamps_match_transformers() -> None:
    processing = pytest.importorskip("transformers.models.qwen3_vl.processing_qwen3_vl")
    rng = random.Random(1)
    for _ in range(100):
        n, total, video_fps = rng.randint(1, 40), rng.randint(40, 900), rng.choice([12.0, 29.97, 30.0])
        indices = sorted(rng.sample(range(total), n))
        want = processing.Qwen3VLProcessor._calculate_timestamps(None, list(indices), video_fps, 2)
        got = patch_times(indices, video_fps, 2)
        assert got == pytest.approx(want, abs=1e-12)
        assert [format_timestamp(t) for t in got] == [f"<{t:.1f} seconds>" for t in want]


def test_timestamp_formats() -> None:
    assert format_timestamp(0.25) == "<0.2 seconds>"  # Python's round-half-even formatting, as transformers writes it
    assert format_timestamp(12.35) == "<12.3 seconds>"
    assert format_timestamp(3599.96, "hms") == "<01:00:00.0>"
    assert format_timestamp(61.25, "hms") == "<00:01:01.2>"
    assert format_timestamp(7384.5, "hms") == "<02:03:04.5>"
    with pytest.raises(ValueError, match="must not be negative, got -1"):
        format_timestamp(-1)
    with pytest.raises(ValueError, match="style must be 'seconds' or 'hms', got 'frames'"):
        format_timestamp(1.0, "frames")  # type: ignore[arg-type]


@pytest.mark.parametrize("cap", [True, False])
def test_frame_size_and_grid_match_transformers_budgets(cap: bool) -> None:
    module = _qwen3_video()
    fake = SimpleNamespace(
        size={"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32},
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        cap_pixels_per_frame=cap,
        max_video_tokens=768,
    )
    ours = VideoProcessor(max_frame_tokens=768 if cap else None)
    rng = random.Random(2)
    for _ in range(200):
        n, h, w = rng.randint(2, 200), rng.randint(8, 2000), rng.randint(8, 2000)
        if max(h, w) / min(h, w) > 150:
            continue
        want = module.Qwen3VLVideoProcessor.get_num_of_video_patches(fake, n, h, w)
        new_h, new_w = ours.target_size(n, h, w)
        assert (-(-n // 2)) * (new_h // 16) * (new_w // 16) == want, (n, h, w)


def test_budgets() -> None:
    proc = VideoProcessor(min_pixels=4 * 32 * 32, max_pixels=64 * 32 * 32, max_frame_tokens=6)
    h, w = proc.target_size(4, 600, 800)
    assert h * w <= 6 * 32 * 32  # per-frame cap: 6 merged tokens
    uncapped = VideoProcessor(min_pixels=4 * 32 * 32, max_pixels=64 * 32 * 32, max_frame_tokens=None)
    h, w = uncapped.target_size(4, 600, 800)
    assert 4 * h * w <= 64 * 32 * 32 and 4 * h * w > 32 * 32 * 32  # total budget shared by all frames
    assert proc.clip_max_pixels(4) == 6 * 32 * 32 * 4


def _transformers_rows(frames: np.ndarray) -> torch.Tensor:
    """transformers' (pure torch) patchify on frames normalised in float64."""
    module = _qwen3_video()
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).double() / 255.0
    x = ((x - 0.5) / 0.5).unsqueeze(0)  # [1, F, C, H, W]
    rows, *_ = module.Qwen3VLVideoProcessor.patchify(None, x, patch_size=16, merge_size=2, temporal_patch_size=2)
    return rows[0]


@pytest.mark.parametrize(("frames", "h", "w"), [(4, 64, 96), (5, 96, 64), (1, 32, 160)])
def test_rows_and_padding_match_transformers_patchify(frames: int, h: int, w: int) -> None:
    video = _video(frames, h, w, seed=frames)
    proc = VideoProcessor(min_pixels=32 * 32, max_pixels=100 * 32 * 32, max_frame_tokens=None)
    out = proc(video, video_fps=2.0, do_sample_frames=False)
    t = -(-frames // 2)
    assert out["video_grid_thw"].tolist() == [[t, h // 16, w // 16]]  # no resize: already in budget
    want = _transformers_rows(video)  # pads by repeating the last frame itself
    torch.testing.assert_close(out["pixel_values_videos"].double(), want, rtol=0, atol=1e-6)
    assert out["frame_indices"] == [list(range(frames)) + [frames - 1] * (2 * t - frames)]
    assert len(out["timestamps"][0]) == t


def test_end_to_end_sampling_resize_and_timestamps() -> None:
    video = _video(50, 70, 90, seed=3)  # 5 s at 10 fps -> 10 frames at 2 fps
    out = VideoProcessor(min_pixels=32 * 32, max_pixels=20 * 32 * 32, max_frame_tokens=None)(video, video_fps=10.0)
    idx = np.round(np.linspace(0, 49, 10)).astype(int).tolist()
    assert out["frame_indices"] == [idx]
    want_times = [(idx[k] + idx[k + 1]) / 20.0 for k in range(0, 10, 2)]
    assert out["timestamp_seconds"][0] == pytest.approx(want_times)
    assert out["timestamps"][0] == [f"<{t:.1f} seconds>" for t in want_times]
    t, gh, gw = out["video_grid_thw"][0].tolist()
    assert t == 5 and 10 * (gh * 16) * (gw * 16) <= 20 * 32 * 32
    assert out["pixel_values_videos"].shape == (t * gh * gw, 1536)


def test_input_forms_agree() -> None:
    video = _video(6, 64, 64, seed=4)
    proc = VideoProcessor(min_pixels=32 * 32, max_pixels=24 * 32 * 32, num_threads=1)
    ref = proc(video, video_fps=3.0)
    as_pil = proc([PIL.Image.fromarray(f) for f in video], video_fps=3.0)
    as_tensor = proc(torch.from_numpy(video).permute(0, 3, 1, 2), video_fps=3.0)
    threaded = VideoProcessor(min_pixels=32 * 32, max_pixels=24 * 32 * 32, num_threads=3)(video, video_fps=3.0)
    for other in (as_pil, as_tensor, threaded):
        assert torch.equal(other["pixel_values_videos"], ref["pixel_values_videos"])
        assert other["timestamps"] == ref["timestamps"]


def test_batch_of_videos_with_own_rates_and_hms() -> None:
    a, b = _video(8, 64, 96, 5), _video(3, 96, 64, 6)
    proc = VideoProcessor(min_pixels=32 * 32, max_pixels=48 * 32 * 32, timestamp_style="hms")
    out = proc([a, b], video_fps=[4.0, 1.0])
    single_a, single_b = proc(a, video_fps=4.0), proc(b, video_fps=1.0)
    assert out["video_grid_thw"].tolist() == single_a["video_grid_thw"].tolist() + single_b["video_grid_thw"].tolist()
    both = torch.cat([single_a["pixel_values_videos"], single_b["pixel_values_videos"]])
    assert torch.equal(out["pixel_values_videos"], both)
    assert out["timestamps"][1] == ["<00:00:00.5>", "<00:00:02.0>"]  # frames 0,1 | 2,2(padded)


def test_missing_video_fps_warns_and_assumes_24() -> None:
    with pytest.warns(UserWarning, match="assuming 24.0 fps"):
        out = VideoProcessor(min_pixels=32 * 32, max_pixels=8 * 32 * 32)(_video(48, 32, 32))
    assert len(out["frame_indices"][0]) == 4  # 2 s at 2 fps


def test_bad_videos() -> None:
    proc = VideoProcessor()
    with pytest.raises(ValueError, match="a video needs at least 1 frame, got 0"):
        proc(np.zeros((0, 8, 8, 3), dtype=np.uint8), video_fps=1.0)
    with pytest.raises(ValueError, match=r"expected frames of 4 dimensions .* got 3 \(shape \(8, 8, 3\)\)"):
        proc(np.zeros((8, 8, 3), dtype=np.uint8), video_fps=1.0)
    with pytest.raises(ValueError, match=r"video 0 frame 0: wrong channel count, expected 1, 3 or 4 channels, got 2"):
        proc(np.zeros((4, 8, 8, 2), dtype=np.uint8), video_fps=1.0)
    with pytest.raises(ValueError, match="all frames must have one size"):
        proc([PIL.Image.new("RGB", (8, 8)), PIL.Image.new("RGB", (9, 8))], video_fps=1.0)
    with pytest.raises(ValueError, match="aspect ratio"):
        proc(np.zeros((4, 2, 500, 3), dtype=np.uint8), video_fps=1.0)
    with pytest.raises(ValueError, match="got 1 video_fps values for 2 videos"):
        proc([np.zeros((4, 8, 8, 3), np.uint8)] * 2, video_fps=[1.0])
    with pytest.raises(ValueError, match="no videos given"):
        proc([])
    with pytest.raises(ValueError, match=r"min_frames \(5\) is larger than max_frames \(4\)"):
        VideoProcessor(min_frames=5, max_frames=4)
