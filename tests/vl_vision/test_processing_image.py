"""ImageProcessor parity with transformers' PIL image processor (Qwen3-VL settings) and a float64 layout reference."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from vl_vision.processing import ImageProcessor

SMALL = {"min_pixels": 64 * 64, "max_pixels": 160 * 160}  # keeps tests fast; exercises up- and down-scaling


def _theirs(**budget: int) -> Any:
    module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    return module.Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": budget.get("min_pixels", 256 * 256), "longest_edge": budget.get("max_pixels", 4096**2)},
    )


def _assert_parity(ours: dict[str, torch.Tensor], theirs: Any) -> None:
    assert torch.equal(ours["image_grid_thw"], torch.as_tensor(theirs["image_grid_thw"]))
    want = torch.as_tensor(np.asarray(theirs["pixel_values"]))
    assert ours["pixel_values"].shape == want.shape
    assert ours["pixel_values"].dtype == torch.float32
    assert (ours["pixel_values"] - want).abs().max().item() <= 0.01


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _image(mode: str, h: int, w: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "RGBA":
        return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
    if mode == "LA":
        return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8)).convert("LA")
    if mode == "L":
        return PIL.Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    if mode == "P":
        return PIL.Image.fromarray(_rgb(h, w, seed)).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=37)
    if mode == "P+transparency":
        image = PIL.Image.fromarray(_rgb(h, w, seed)).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 3
        return image
    if mode == "CMYK":
        return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), mode="CMYK")
    if mode == "1":
        return PIL.Image.fromarray(_rgb(h, w, seed)).convert("1")
    return PIL.Image.fromarray(_rgb(h, w, seed))


MODES = ["RGB", "RGBA", "LA", "L", "P", "P+transparency", "CMYK", "1"]


@pytest.mark.parametrize("mode", MODES)
def test_modes_match_transformers(mode: str) -> None:
    images = [_image(mode, h, w, seed) for seed, (h, w) in enumerate([(37, 53), (121, 67), (250, 190), (1, 1)])]
    ours = ImageProcessor(**SMALL, min_side=1)(images)  # min_side=1: upscale the 1 x 1 picture as transformers
    _assert_parity(ours, _theirs(**SMALL)(images, return_tensors="np"))


def test_default_qwen3_vl_budget_matches_transformers() -> None:
    images = [PIL.Image.fromarray(_rgb(h, w, s)) for s, (h, w) in enumerate([(97, 301), (300, 211), (5, 700)])]
    _assert_parity(ImageProcessor()(images), _theirs()(images, return_tensors="np"))


def test_sixteen_bit_clip_mode_matches_transformers() -> None:
    rng = np.random.default_rng(5)
    images = [PIL.Image.fromarray(rng.integers(0, 600, (h, w), dtype=np.uint16)) for h, w in [(45, 77), (90, 33)]]
    assert images[0].mode == "I;16"
    ours = ImageProcessor(**SMALL, high_bit_depth="clip")(images)
    _assert_parity(ours, _theirs(**SMALL)(images, return_tensors="np"))


def test_sixteen_bit_scale_mode_maps_full_range() -> None:
    values = np.random.default_rng(6).integers(0, 65536, (40, 50), dtype=np.uint16)
    eight_bit = PIL.Image.fromarray(np.rint(values / 257.0).astype(np.uint8))
    proc = ImageProcessor(**SMALL)
    got = proc([PIL.Image.fromarray(values), values])
    want = proc([eight_bit, eight_bit])
    assert torch.equal(got["pixel_values"], want["pixel_values"])
    _assert_parity(want, _theirs(**SMALL)([eight_bit, eight_bit], return_tensors="np"))


def _exif_jpeg(orientation: int) -> bytes:
    image = PIL.Image.fromarray(_rgb(40, 70, seed=orientation))
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg_matches_transformers_loading_the_file(orientation: int, tmp_path: Path) -> None:
    data = _exif_jpeg(orientation)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    proc = ImageProcessor(**SMALL)
    ours = proc([data, path, str(path), PIL.Image.open(io.BytesIO(data))])
    theirs = _theirs(**SMALL)([str(path)] * 4, return_tensors="np")
    _assert_parity(ours, theirs)
    if orientation in (6, 8):  # a quarter turn swaps height and width
        assert ours["image_grid_thw"][0, 1] > ours["image_grid_thw"][0, 2]


def test_array_and_tensor_inputs_match_transformers() -> None:
    rng = np.random.default_rng(7)
    hwc = _rgb(33, 91, 1)
    rgba = rng.integers(0, 256, (64, 48, 4), dtype=np.uint8)
    grey = rng.integers(0, 256, (29, 57), dtype=np.uint8)
    chw = torch.from_numpy(_rgb(70, 45, 2)).permute(2, 0, 1).contiguous()
    ours = ImageProcessor(**SMALL)([hwc, rgba, grey, chw])
    theirs = _theirs(**SMALL)([hwc, rgba, grey[:, :, None], chw], return_tensors="np")  # no 2-D arrays there
    _assert_parity(ours, theirs)


def test_float_and_bf16_inputs_equal_their_uint8_value() -> None:
    pixels = _rgb(50, 66, 3)
    proc = ImageProcessor(**SMALL)
    want = proc(pixels)["pixel_values"]
    as_float = proc(pixels.astype(np.float32) / 255.0)["pixel_values"]
    assert torch.equal(as_float, want)
    as_bf16 = torch.from_numpy(pixels).permute(2, 0, 1).to(torch.bfloat16) / 255.0
    # bf16 keeps 8 significant bits: values may move by one step of 1/255 -> 2/255 after normalisation
    assert (proc(as_bf16.clamp(0, 1))["pixel_values"] - want).abs().max().item() <= 2 / 255 + 1e-6


def _reference_rows(pixels: np.ndarray, patch: int = 16, temporal: int = 2, merge: int = 2) -> torch.Tensor:
    """float64 loop over merge blocks, the order written out in words in REFERENCE.md section 2."""
    x = pixels.astype(np.float64) / 255.0
    x = (x - 0.5) / 0.5
    h, w = x.shape[0] // patch, x.shape[1] // patch
    rows = []
    for bh in range(0, h, merge):
        for bw in range(0, w, merge):
            for i in range(merge):
                for j in range(merge):
                    py, px = (bh + i) * patch, (bw + j) * patch
                    block = x[py : py + patch, px : px + patch].transpose(2, 0, 1)  # C, P, P
                    rows.append(np.stack([block] * temporal, axis=1).reshape(-1))  # C, T, P, P
    return torch.from_numpy(np.stack(rows))


@pytest.mark.parametrize(("h", "w"), [(64, 96), (160, 32), (96, 224)])
def test_merge_block_order_matches_float64_reference(h: int, w: int) -> None:
    pixels = _rgb(h, w, seed=h + w)
    out = ImageProcessor(min_pixels=32 * 32, max_pixels=512 * 512)(pixels)  # already multiples of 32: no resize
    assert out["image_grid_thw"].tolist() == [[1, h // 16, w // 16]]
    torch.testing.assert_close(out["pixel_values"].double(), _reference_rows(pixels), rtol=0, atol=1e-6)


def test_threads_do_not_change_the_result() -> None:
    images = [PIL.Image.fromarray(_rgb(h, w, h)) for h, w in [(70, 90), (33, 200), (150, 150), (64, 64)]]
    one = ImageProcessor(**SMALL, num_threads=1)(images)
    many = ImageProcessor(**SMALL, num_threads=4)(images)
    assert torch.equal(one["pixel_values"], many["pixel_values"])
    assert torch.equal(one["image_grid_thw"], many["image_grid_thw"])


def test_single_image_and_helpers() -> None:
    proc = ImageProcessor()
    out = proc(PIL.Image.new("RGB", (640, 480)))
    assert out["pixel_values"].shape == (30 * 40, 1536)
    assert out["image_grid_thw"].tolist() == [[1, 30, 40]]
    assert proc.num_patches(480, 640) == 1200 and proc.patch_dim == 1536 and proc.factor == 32
    assert torch.allclose(out["pixel_values"], torch.full((1, 1), -1.0))  # black -> (0 - 0.5) / 0.5
