"""Decoding and colour conversion of image inputs to RGB ``uint8``, with clear errors for bad input.

Implements the input side of the Qwen3-VL preprocessing (Qwen3-VL technical report,
arXiv 2511.21631, section 2): every image becomes a 3-channel RGB picture before it is resized and
patchified. Conversions follow transformers' PIL backend so that pixel values match it: a picture
with transparency is composited onto white, CMYK / palette / grey pictures go through Pillow's
``convert("RGB")``. Files and bytes are decoded completely (a truncated file is an error, not a
partly grey picture) and EXIF orientation is applied.

Every Pillow mode is handled (each has a test). Value ranges of the modes that are not 8-bit:

- ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``: 16-bit, ``0..65535``, mapped by ``high_bit_depth``.
- ``I`` (32-bit integers) and ``F`` (32-bit floats) carry no range of their own; the smallest of
  ``[0, 1]`` (``F`` only: the float convention, as for float arrays), ``[0, 255]`` (what Pillow's
  ``convert("I")`` / ``convert("F")`` of an 8-bit picture give) and ``[0, 65535]`` (16-bit data,
  mapped by ``high_bit_depth``) that holds every value is taken as the range. NaN, infinite,
  negative or larger values are a ``ValueError`` naming the image.

Transparency: an alpha band (``RGBA``, ``LA``, ``PA``), a premultiplied one (``RGBa``, ``La``) or
a transparency key (``P``, ``L``, ``RGB``, ``1``, ``I``, ``I;16``... with ``info["transparency"]``)
is composited onto white, so a fully transparent picture is white whatever its colour values.
``LAB``'s ``A`` band is a colour axis, not alpha.

Notation: ``H, W`` height and width; ``C`` channels; arrays are ``[H, W, C]`` (numpy) or
``[C, H, W]`` (torch) unless stated.
"""

from __future__ import annotations

import io
import math
import os
import struct
from pathlib import Path
from typing import Literal, TypeAlias

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

ImageInput: TypeAlias = "PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike[str] | bytes"
"""One image: a PIL image, an ``[H, W, C]`` / ``[H, W]`` array, a ``[C, H, W]`` tensor, a path or encoded bytes."""

HighBitDepth: TypeAlias = Literal["scale", "clip"]
"""How 16-bit pictures become 8-bit: ``"scale"`` maps 0..65535 to 0..255; ``"clip"`` keeps values and clips at 255."""

_VALID_CHANNELS = (1, 3, 4)
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# What a corrupt or truncated file can raise while Pillow identifies or decodes it.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, ZeroDivisionError)


def open_image(source: str | os.PathLike[str] | bytes, *, name: str = "image") -> PIL.Image.Image:
    """Decode an image file or encoded bytes completely.

    Args:
        source: A path, or the encoded bytes of an image file.
        name: How the input is called in error messages (e.g. ``"image 3"``).

    Returns:
        The decoded PIL image (pixels loaded, file closed).

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: The data is empty, not an image, or truncated / corrupt.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        where = f"{name} ({len(data)} bytes)"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: no such file {str(path)!r}")
        data = path.read_bytes()
        where = f"{name} ({str(path)!r}, {len(data)} bytes)"
    if not data:
        raise ValueError(f"{where} is empty: expected an encoded image")
    try:
        image = PIL.Image.open(io.BytesIO(data))
    except PIL.UnidentifiedImageError as exc:
        raise ValueError(f"{where} is not a recognised image file (Pillow cannot identify its format)") from exc
    except PIL.Image.DecompressionBombError as exc:
        raise ValueError(f"{where} is too large to decode safely: {exc}") from exc
    except _DECODE_ERRORS as exc:  # a known header followed by junk fails while the header is parsed
        raise ValueError(f"{where} could not be decoded, the data is truncated or corrupt: {exc}") from exc
    try:
        image.load()
    except _DECODE_ERRORS as exc:
        fmt = image.format or "image"
        raise ValueError(f"{where} could not be decoded, the {fmt} data is truncated or corrupt: {exc}") from exc
    return image


def _apply_exif_orientation(image: PIL.Image.Image) -> PIL.Image.Image:
    # Checking the tag first avoids the copy `exif_transpose` makes even for upright pictures.
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except _DECODE_ERRORS:  # unreadable EXIF: the pixels are still good, keep them as stored
        return image
    if orientation in (0, 1):
        return image
    return PIL.ImageOps.exif_transpose(image)


def _value_range(values: np.ndarray, mode: str, name: str) -> float:
    """The top of the range the values of an ``I*`` / ``F`` picture are read in (see the module docstring)."""
    if values.size == 0:
        raise ValueError(f"{name}: image size must be positive")
    lo, hi = float(values.min()), float(values.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name}: mode {mode} picture has NaN or infinite values")
    if lo < 0.0 or hi > 65535.0:
        raise ValueError(f"{name}: mode {mode} values must lie in [0, 65535], got min {lo:g} and max {hi:g}")
    if mode.startswith("I;16"):
        return 65535.0
    if mode == "F" and hi <= 1.0:
        return 1.0
    return 255.0 if hi <= 255.0 else 65535.0


def _high_depth_to_rgb(image: PIL.Image.Image, high_bit_depth: HighBitDepth, name: str) -> PIL.Image.Image:
    """An ``I;16*`` / ``I`` / ``F`` picture as 8-bit RGB, its transparency key composited onto white."""
    values = np.asarray(image).astype(np.float64)
    top = _value_range(values, image.mode, name)
    if top == 1.0:
        grey = values * 255.0
    elif top == 255.0:
        grey = values
    else:
        grey = np.minimum(values, 255.0) if high_bit_depth == "clip" else values / 257.0
    rgb = np.repeat(np.rint(grey).astype(np.uint8)[:, :, None], 3, axis=2)
    key = image.info.get("transparency")
    if isinstance(key, int | float) and not isinstance(key, bool):
        rgb[values == key] = 255
    return PIL.Image.fromarray(rgb)


def pil_to_rgb(
    image: PIL.Image.Image, *, high_bit_depth: HighBitDepth = "scale", name: str = "image"
) -> PIL.Image.Image:
    """Convert a PIL image of any mode to RGB the way transformers' PIL backend does.

    EXIF orientation is applied first. Pictures with an alpha band (premultiplied or not) or a
    transparency key are composited onto white; 16-bit and 32-bit grey pictures (``I;16``, ``I``,
    ``F``) are mapped to 8-bit as the module docstring says; every other mode uses Pillow's
    ``convert("RGB")``.

    Args:
        image: The input picture.
        high_bit_depth: ``"scale"`` (default) maps 16-bit values 0..65535 to 0..255 (``round(v / 257)``);
            ``"clip"`` keeps the values and clips them at 255, as Pillow's ``convert`` and therefore
            transformers do.
        name: How the input is called in error messages.

    Returns:
        An RGB image (the input object itself when it already is RGB without EXIF rotation).

    Raises:
        ValueError: An ``I`` / ``F`` picture with NaN, infinite, negative or too large values.
    """
    image = _apply_exif_orientation(image)
    if image.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(image, high_bit_depth, name)
    if image.mode == "La":  # premultiplied; Pillow converts it to LA only
        image = image.convert("LA")
    if image.mode == "1" and image.info.get("transparency") is not None:
        image = image.convert("L")  # Pillow's 1 -> RGBA ignores the key; L -> RGBA applies it
    if image.mode in _ALPHA_MODES or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")  # RGBa is un-premultiplied here; keys become alpha 0
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _channels_last(array: np.ndarray, *, prefer_first: bool, name: str) -> np.ndarray:
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ValueError(
            f"{name}: expected an array of 2 or 3 dimensions, got {array.ndim} (shape {tuple(array.shape)})"
        )
    first, last = array.shape[0] in _VALID_CHANNELS, array.shape[-1] in _VALID_CHANNELS
    if first and (prefer_first or not last):
        return np.moveaxis(array, 0, -1)
    if last:
        return array
    channels = array.shape[0] if prefer_first else array.shape[-1]
    raise ValueError(
        f"{name}: wrong channel count, expected 1, 3 or 4 channels, got {channels} (shape {tuple(array.shape)})"
    )


def _to_uint8(array: np.ndarray, high_bit_depth: HighBitDepth, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.size == 0:
        raise ValueError(f"{name}: image size must be positive, got shape {tuple(array.shape)}")
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        lo, hi = float(array.min()), float(array.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name}: float images must have values in [0, 1], got min {lo} and max {hi}")
        return np.rint(array * 255.0).astype(np.uint8)
    if array.dtype == np.uint16:
        if high_bit_depth == "clip":
            return np.minimum(array, 255).astype(np.uint8)
        return np.rint(array.astype(np.float32) / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"{name}: integer images of dtype {array.dtype} must have values in [0, 255], got min {lo} and max {hi}"
            )
        return array.astype(np.uint8)
    raise ValueError(f"{name}: unsupported array dtype {array.dtype}")


def array_to_rgb(
    array: np.ndarray | torch.Tensor, *, high_bit_depth: HighBitDepth = "scale", name: str = "image"
) -> np.ndarray:
    """Convert an image array to RGB ``uint8 [H, W, 3]``.

    numpy arrays are read as ``[H, W, C]`` (``[C, H, W]`` when only the first axis has 1, 3 or 4
    entries); tensors as ``[C, H, W]`` (``[H, W, C]`` when only the last axis does). 2-D inputs
    are grey. ``uint8`` values are used as they are, ``uint16`` values are mapped according to
    ``high_bit_depth``, floats must lie in ``[0, 1]``, other integer types in ``[0, 255]``. Grey is
    repeated to three channels; RGBA is composited onto white (``a * rgb + (1 - a) * 255``).

    Args:
        array: The image.
        high_bit_depth: ``"scale"`` or ``"clip"`` for ``uint16`` input (see :func:`pil_to_rgb`).
        name: How the input is called in error messages.

    Returns:
        A C-contiguous ``uint8`` array ``[H, W, 3]``.

    Raises:
        ValueError: Wrong number of dimensions or channels, empty image, values out of range.
    """
    is_tensor = isinstance(array, torch.Tensor)
    if isinstance(array, torch.Tensor):
        tensor = array.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        array = tensor.numpy()
    hwc = _channels_last(array, prefer_first=is_tensor, name=name)
    if hwc.shape[0] < 1 or hwc.shape[1] < 1:
        raise ValueError(f"{name}: image size must be positive, got height={hwc.shape[0]} and width={hwc.shape[1]}")
    pixels = _to_uint8(hwc, high_bit_depth, name)
    channels = pixels.shape[-1]
    if channels == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    elif channels == 4:
        alpha = pixels[..., 3:4].astype(np.float32) / 255.0
        blended = pixels[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        pixels = np.rint(blended).astype(np.uint8)
    return np.ascontiguousarray(pixels)


def to_rgb_image(image: ImageInput, *, high_bit_depth: HighBitDepth = "scale", name: str = "image") -> PIL.Image.Image:
    """Turn any supported image input into an RGB PIL image, ready for resizing.

    Args:
        image: A PIL image, numpy array, torch tensor, path or encoded bytes (see :data:`ImageInput`).
        high_bit_depth: How 16-bit input becomes 8-bit (``"scale"`` or ``"clip"``).
        name: How the input is called in error messages.

    Returns:
        An RGB PIL image.

    Raises:
        TypeError: The input is of an unsupported type.
        ValueError: The input is empty, not an image, truncated, or has a wrong shape or channel count.
    """
    if isinstance(image, PIL.Image.Image):
        if image.width < 1 or image.height < 1:
            raise ValueError(f"{name}: image size must be positive, got height={image.height} and width={image.width}")
        try:  # a lazily opened picture decodes here, so its truncation is reported here
            image.load()
        except _DECODE_ERRORS as exc:
            raise ValueError(f"{name}: the {image.format or 'image'} data is truncated or corrupt: {exc}") from exc
        return pil_to_rgb(image, high_bit_depth=high_bit_depth, name=name)
    if isinstance(image, np.ndarray | torch.Tensor):
        return PIL.Image.fromarray(array_to_rgb(image, high_bit_depth=high_bit_depth, name=name))
    if isinstance(image, str | os.PathLike | bytes | bytearray | memoryview):
        return pil_to_rgb(open_image(image, name=name), high_bit_depth=high_bit_depth, name=name)
    raise TypeError(
        f"{name}: unsupported input type {type(image).__name__}; expected a PIL image, numpy array, torch tensor, "
        "path or bytes"
    )
