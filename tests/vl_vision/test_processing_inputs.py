"""Input handling of the image processor: every supported input type, and a clear ValueError for each kind of bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from vl_vision.processing import ImageProcessor, open_image, to_rgb_image

SMALL = {"min_pixels": 32 * 32, "max_pixels": 96 * 96}


def _encoded(fmt: str, h: int = 40, w: int = 60) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def test_every_input_type_gives_the_same_rows(tmp_path: Path) -> None:
    data = _encoded("PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    pixels = np.array(PIL.Image.open(io.BytesIO(data)).convert("RGB"))
    inputs = [
        data,
        bytearray(data),
        path,
        str(path),
        PIL.Image.open(io.BytesIO(data)),
        pixels,
        np.ascontiguousarray(pixels.transpose(2, 0, 1)),  # channel-first numpy is recognised
        torch.from_numpy(pixels).permute(2, 0, 1),
        torch.from_numpy(pixels),  # channel-last tensor is recognised
        pixels.astype(np.int64),
    ]
    out = ImageProcessor(**SMALL)(inputs)
    rows = out["pixel_values"].view(len(inputs), -1, 1536)
    for i in range(1, len(inputs)):
        assert torch.equal(rows[i], rows[0]), i
    assert out["image_grid_thw"].tolist() == [[1, 2, 4]] * len(inputs)


def test_empty_bytes() -> None:
    with pytest.raises(ValueError, match=r"image 1 \(0 bytes\) is empty"):
        ImageProcessor(**SMALL)([_encoded("PNG"), b""])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(fmt: str, tmp_path: Path) -> None:
    data = _encoded(fmt, 120, 90)
    cut = data[: len(data) // 2]
    with pytest.raises(
        ValueError, match=rf"image 0 \({len(cut)} bytes\) could not be decoded, the {fmt} data is truncated"
    ):
        ImageProcessor(**SMALL)(cut)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(cut)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ImageProcessor(**SMALL)(path)


def test_non_image_bytes_and_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"image 0 \(27 bytes\) is not a recognised image file"):
        ImageProcessor(**SMALL)(b"this is not an image at all")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt.*is not a recognised image file"):
        ImageProcessor(**SMALL)(text)


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        ImageProcessor(**SMALL)("/nonexistent/picture.png")


def test_one_by_one_is_rejected_by_default_and_upscaled_with_min_side_1() -> None:
    tiny = PIL.Image.new("RGB", (1, 1), (255, 0, 0))
    with pytest.raises(
        ValueError, match=r"image 0: image of height=1 and width=1 is too small: each side must be at least 2"
    ):
        ImageProcessor()(tiny)
    assert ImageProcessor(min_side=1)(tiny)["image_grid_thw"].tolist() == [[1, 16, 16]]  # 256 x 256, as transformers


def test_aspect_ratio_above_200_names_the_image() -> None:
    wide = PIL.Image.new("RGB", (403, 2))
    with pytest.raises(
        ValueError, match=r"image 1: aspect ratio 201\.5 \(height=2, width=403\) is above the maximum of 200"
    ):
        ImageProcessor()([PIL.Image.new("RGB", (8, 8)), wide])


@pytest.mark.parametrize("channels", [2, 5, 6])
def test_wrong_channel_count_numpy(channels: int) -> None:
    bad = np.zeros((20, 30, channels), dtype=np.uint8)
    with pytest.raises(
        ValueError,
        match=rf"wrong channel count, expected 1, 3 or 4 channels, got {channels} \(shape \(20, 30, {channels}\)\)",
    ):
        ImageProcessor(**SMALL)(bad)


def test_wrong_channel_count_tensor() -> None:
    with pytest.raises(ValueError, match=r"got 2 \(shape \(2, 20, 30\)\)"):
        ImageProcessor(**SMALL)(torch.zeros(2, 20, 30, dtype=torch.uint8))


def test_wrong_number_of_dimensions() -> None:
    with pytest.raises(ValueError, match=r"expected an array of 2 or 3 dimensions, got 4 \(shape \(1, 8, 8, 3\)\)"):
        ImageProcessor(**SMALL)(np.zeros((1, 8, 8, 3), dtype=np.uint8))


def test_empty_arrays_and_images() -> None:
    with pytest.raises(ValueError, match="image size must be positive"):
        ImageProcessor(**SMALL)(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"height=0 and width=5"):
        to_rgb_image(PIL.Image.new("RGB", (5, 0)))


def test_values_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"float images must have values in \[0, 1\], got min -0\.5 and max 2\.0"):
        ImageProcessor(**SMALL)(np.array([[[-0.5, 2.0, 0.0]]] * 4, dtype=np.float32).repeat(4, axis=1))
    with pytest.raises(ValueError, match=r"values in \[0, 255\], got min 0 and max 300"):
        ImageProcessor(**SMALL)(np.full((4, 4, 3), 300, dtype=np.int32) * np.eye(4, dtype=np.int32)[:, :, None])
    with pytest.raises(ValueError, match="must have values in"):
        ImageProcessor(**SMALL)(np.full((4, 4, 3), np.nan, dtype=np.float32))


def test_empty_batch_and_unsupported_types() -> None:
    with pytest.raises(ValueError, match="no images given"):
        ImageProcessor()([])
    with pytest.raises(TypeError, match="unsupported input type int"):
        ImageProcessor()([3])


def test_bad_processor_settings() -> None:
    with pytest.raises(ValueError, match=r"min_pixels \(10\) is larger than max_pixels \(5\)"):
        ImageProcessor(min_pixels=10, max_pixels=5)
    with pytest.raises(ValueError, match="image_std entries must be positive"):
        ImageProcessor(image_std=(0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="high_bit_depth must be 'scale' or 'clip', got 'wrap'"):
        ImageProcessor(high_bit_depth="wrap")  # type: ignore[arg-type]


def test_open_image_decodes_completely() -> None:
    image = open_image(_encoded("PNG"))
    assert image.size == (60, 40)
    assert np.asarray(image).shape == (40, 60, 3)


def test_rgba_composited_on_white() -> None:
    clear = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    assert (np.asarray(to_rgb_image(clear)) == 255).all()
    assert (np.asarray(to_rgb_image(PIL.Image.fromarray(clear))) == 255).all()
