"""smart_resize / smart_resize_video against transformers' functions and the budget rules of REFERENCE.md section 2."""

from __future__ import annotations

import math
import random

import pytest

from vl_vision.processing import smart_resize, smart_resize_video


def _random_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = [(1, 1), (1, 2), (2, 1), (31, 33), (1, 200), (200, 1), (3, 599), (10000, 50), (16385, 16385)]
    while len(sizes) < count:
        h = int(math.exp(rng.uniform(0, math.log(20000))))
        w = int(math.exp(rng.uniform(0, math.log(20000))))
        if max(h, w) / min(h, w) <= 200:
            sizes.append((h, w))
    return sizes


def test_matches_transformers_on_random_sizes() -> None:
    ref = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl").smart_resize
    budgets = [(256 * 256, 4096 * 4096), (32 * 32, 128 * 128), (56 * 56, 28 * 28 * 1280)]
    for h, w in _random_sizes(400, seed=0):
        for factor, (lo, hi) in zip((32, 32, 28), budgets):
            want = ref(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
            assert smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi) == want, (h, w, factor)


def test_video_matches_transformers_on_random_sizes() -> None:
    ref = pytest.importorskip("transformers.models.qwen3_vl.video_processing_qwen3_vl").smart_resize
    rng = random.Random(1)
    for h, w in _random_sizes(200, seed=2):
        frames = rng.choice([2, 3, 4, 7, 16, 33, 768])
        lo, hi = 128 * 32 * 32, rng.choice([768 * 32 * 32, 160 * 32 * 32 * 40])
        want = ref(frames, h, w, temporal_factor=2, factor=32, min_pixels=lo, max_pixels=hi)
        assert smart_resize_video(frames, h, w, 32, 2, lo, hi) == want, (frames, h, w)


def test_budget_and_multiples_against_float64_rule() -> None:
    for h, w in _random_sizes(300, seed=3):
        rh, rw = smart_resize(h, w)
        assert rh % 32 == 0 and rw % 32 == 0 and rh >= 32 and rw >= 32
        if max(h, w) / min(h, w) < 100:  # short side never clamped to the factor
            assert 256 * 256 <= rh * rw <= 4096 * 4096, (h, w, rh, rw)
            # each side is the exactly scaled side (same ratio h / w) moved by less than one factor step
            assert (rh - 32) / (rw + 32) < h / w, (h, w, rh, rw)
            assert rw <= 32 or h / w < (rh + 32) / (rw - 32), (h, w, rh, rw)


def test_tiny_image_is_upscaled_like_transformers() -> None:
    assert smart_resize(1, 1) == (256, 256)
    assert smart_resize(1, 2, min_pixels=32 * 32, max_pixels=64 * 64) == (32, 64)


def test_no_change_when_already_in_budget() -> None:
    assert smart_resize(480, 640) == (480, 640)
    assert smart_resize(479, 641) == (480, 640)


@pytest.mark.parametrize(("h", "w"), [(1, 201), (402, 2), (10, 2500)])
def test_aspect_ratio_above_200_names_the_numbers(h: int, w: int) -> None:
    with pytest.raises(ValueError, match=r"aspect ratio .* above the maximum of 200") as info:
        smart_resize(h, w)
    assert f"height={h}" in str(info.value) and f"width={w}" in str(info.value)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize_video(4, h, w)


def test_aspect_ratio_of_exactly_200_is_accepted() -> None:
    assert smart_resize(1, 200) == (32, 3648)  # upscaled to >= 256 * 256 pixels


@pytest.mark.parametrize(("h", "w"), [(0, 5), (5, 0), (-1, 4)])
def test_non_positive_sizes_are_rejected(h: int, w: int) -> None:
    with pytest.raises(ValueError, match=rf"height={h} and width={w}"):
        smart_resize(h, w)


def test_inconsistent_budget_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"min_pixels \(100\) is larger than max_pixels \(50\)"):
        smart_resize(64, 64, min_pixels=100, max_pixels=50)
    with pytest.raises(ValueError, match="num_frames=0"):
        smart_resize_video(0, 64, 64)


def test_single_frame_clip_is_budgeted_as_one_temporal_patch() -> None:
    assert smart_resize_video(1, 480, 640) == smart_resize_video(2, 480, 640)
