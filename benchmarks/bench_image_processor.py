"""Question: is vl_vision's ImageProcessor at least as fast as transformers' PIL image processor?

Case from the issue: a batch of 64 random RGB images of mixed sizes (sides drawn from 200..1200
pixels), processed with the Qwen3-VL settings (patch 16, merge 2, temporal patch 2, mean/std 0.5,
min/max pixels 256^2 / 4096^2). Baseline: transformers' ``Qwen2VLImageProcessorPil`` (the
torchvision-free backend Qwen3-VL's processor falls back to). Outputs are checked equal (grid
exactly, values within 0.01) before timing. Ours uses its default thread pool.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._harness import Row, compare


def _images(count: int, low: int, high: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        height, width = (int(v) for v in rng.integers(low, high + 1, size=2))
        images.append(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
    return images


def run(quick: bool) -> list[Row]:
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        print("bench_image_processor: transformers is not installed; no baseline to compare against")
        return []
    from vl_vision.processing import ImageProcessor

    theirs = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": 256 * 256, "longest_edge": 4096 * 4096},
    )
    ours = ImageProcessor()
    images = _images(64, 200, 1200)
    want, got = theirs(images, return_tensors="pt"), ours(images)
    if not torch.equal(want["image_grid_thw"], got["image_grid_thw"]):
        raise AssertionError("image_grid_thw differs from transformers")
    error = (want["pixel_values"] - got["pixel_values"]).abs().max().item()
    if error > 0.01:
        raise AssertionError(f"pixel_values differ from transformers by {error}")
    return [
        compare(
            "ImageProcessor",
            "64 RGB images, sides 200..1200 px, Qwen3-VL settings",
            baseline="transformers Qwen2VLImageProcessorPil",
            baseline_fn=lambda: theirs(images, return_tensors="pt"),
            ours_fn=lambda: ours(images),
            warmup=1,
            repeat=3 if quick else 7,
            note=f"{ours.num_threads} threads",
        )
    ]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(f"{row.case}: {row.baseline_ms:.1f} ms vs {row.ours_ms:.1f} ms = {row.speedup:.2f}x")
