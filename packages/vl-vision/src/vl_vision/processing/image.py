"""Torchvision-free image processor of the Qwen3-VL family: dynamic resolution, merge-block patch rows.

Implements the image preprocessing of Qwen3-VL (Qwen3-VL technical report, arXiv 2511.21631,
section 2; REFERENCE.md section 2): convert to RGB, resize with Pillow's bicubic filter to the
:func:`smart_resize` target, rescale by 1/255, normalise with mean/std (0.5 each), duplicate the
picture along time to one temporal patch, and flatten into ``[N, C * T * P * P]`` rows in 2 x 2
merge-block order. Values equal transformers' ``Qwen2VLImageProcessorPil`` configured for
Qwen3-VL (patch 16, merge 2, mean/std 0.5) to float32 rounding.

Speed: decoding, colour conversion and Pillow resizing (which release the GIL) run in a thread
pool; patch rows are written straight into one preallocated output with one strided ``uint8 ->
float`` copy and one in-place affine per image, instead of separate rescale, normalise and
patchify passes over float64/float32 copies.

Notation: ``N`` patch rows of all images; ``n`` images; ``C = 3``; ``T`` temporal patch size;
``P`` patch size; ``m`` merge size; grid ``(t, h, w)`` = (1, H / P, W / P).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypedDict

import numpy as np
import PIL.Image
import torch

from ._inputs import HighBitDepth, ImageInput, to_rgb_image
from ._patchify import normalization, patchify_into
from ._resize import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, smart_resize

__all__ = ["ImageBatch", "ImageProcessor"]


class ImageBatch(TypedDict):
    """Output of :class:`ImageProcessor`.

    Attributes:
        pixel_values: float32 ``[N, C * T * P * P]`` patch rows of all images, image after image.
        image_grid_thw: int64 ``[n, 3]`` patch grid ``(1, H / P, W / P)`` of each image.
    """

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor


def default_num_threads() -> int:
    """Worker threads used when ``num_threads`` is not given: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


class ImageProcessor:
    """Turn a batch of images into Qwen3-VL vision-encoder input.

    Args:
        patch_size: ``P``, pixels per patch side (16 for Qwen3-VL).
        temporal_patch_size: ``T``, frames per temporal patch; a still image is repeated ``T`` times.
        merge_size: ``m``, patches per merged-token side; resized sides are multiples of ``P * m``.
        min_pixels: Smallest resized area (transformers' ``size["shortest_edge"]``).
        max_pixels: Largest resized area (transformers' ``size["longest_edge"]``).
        image_mean: Per-channel mean on the ``[0, 1]`` scale.
        image_std: Per-channel standard deviation.
        high_bit_depth: ``"scale"`` (default) maps 16-bit pictures 0..65535 to 0..255; ``"clip"``
            clips them at 255 like Pillow's ``convert`` and thus transformers do.
        min_side: Inputs with a side shorter than this are rejected. The default 2 rejects 1-pixel
            pictures (usually tracking pixels or broken files), which transformers would silently
            upscale to a 256 x 256 blob; ``min_side=1`` accepts them as transformers does.
        num_threads: Worker threads for decoding and resizing (default: usable CPUs, at most 8;
            1 = run in the calling thread).

    Example:
        >>> from PIL import Image
        >>> proc = ImageProcessor()
        >>> out = proc([Image.new("RGB", (640, 480)), Image.new("L", (100, 300))])
        >>> out["pixel_values"].shape, out["image_grid_thw"].tolist()
        (torch.Size([1480, 1536]), [[1, 30, 40], [1, 28, 10]])
    """

    def __init__(
        self,
        patch_size: int = 16,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        min_pixels: int = DEFAULT_MIN_PIXELS,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        *,
        high_bit_depth: HighBitDepth = "scale",
        min_side: int = 2,
        num_threads: int | None = None,
    ) -> None:
        for label, value in (("patch_size", patch_size), ("temporal_patch_size", temporal_patch_size)):
            if value < 1:
                raise ValueError(f"{label} must be positive, got {value}")
        if merge_size < 1:
            raise ValueError(f"merge_size must be positive, got {merge_size}")
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
        if len(image_mean) != 3:
            raise ValueError(f"image_mean needs 3 entries (RGB), got {len(image_mean)}")
        if high_bit_depth not in ("scale", "clip"):
            raise ValueError(f"high_bit_depth must be 'scale' or 'clip', got {high_bit_depth!r}")
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.image_mean = tuple(float(v) for v in image_mean)
        self.image_std = tuple(float(v) for v in image_std)
        self.high_bit_depth: HighBitDepth = high_bit_depth
        self.min_side = min_side
        self.num_threads = default_num_threads() if num_threads is None else max(1, num_threads)
        self._scale, self._bias = normalization(self.image_mean, self.image_std)

    @property
    def factor(self) -> int:
        """Side multiple of every resized image: ``patch_size * merge_size``."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values per patch row: ``3 * temporal_patch_size * patch_size ** 2``."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """Resized ``(height, width)`` of a ``height x width`` input (see :func:`smart_resize`)."""
        if min(height, width) < self.min_side:
            raise ValueError(
                f"image of height={height} and width={width} is too small: each side must be at least "
                f"{self.min_side} pixels"
            )
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def num_patches(self, height: int, width: int) -> int:
        """Patch rows an input of ``height x width`` produces (merged tokens = this / ``merge_size ** 2``)."""
        h, w = self.target_size(height, width)
        return (h // self.patch_size) * (w // self.patch_size)

    def resize(self, image: ImageInput, *, name: str = "image") -> np.ndarray:
        """Convert one input to RGB and resize it to its target size.

        Args:
            image: Any supported input (PIL image, array, tensor, path, bytes).
            name: How the input is called in error messages.

        Returns:
            ``uint8 [H, W, 3]`` with ``H`` and ``W`` multiples of :attr:`factor`.
        """
        rgb = to_rgb_image(image, high_bit_depth=self.high_bit_depth, name=name)
        try:
            height, width = self.target_size(rgb.height, rgb.width)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        if (height, width) != (rgb.height, rgb.width):
            rgb = rgb.resize((width, height), resample=PIL.Image.Resampling.BICUBIC)
        return np.asarray(rgb)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> ImageBatch:
        """Process one image or a batch.

        Args:
            images: One input or a sequence of inputs: PIL images (any mode), numpy arrays
                ``[H, W, C]`` / ``[H, W]`` (uint8, uint16, float in [0, 1]), torch tensors ``[C, H, W]``,
                file paths or encoded bytes. ``C`` must be 1, 3 or 4.

        Returns:
            ``{"pixel_values": float32 [N, 3 * T * P * P], "image_grid_thw": int64 [n, 3]}``.

        Raises:
            ValueError: An input is empty, not an image, truncated, too small, has a wrong channel
                count or an aspect ratio above 200 (the message names the image's index).
        """
        batch: list[ImageInput] = list(images) if isinstance(images, list | tuple) else [images]  # type: ignore[list-item]
        if not batch:
            raise ValueError("no images given: expected at least one image")
        names = [f"image {i}" for i in range(len(batch))]
        workers = min(self.num_threads, len(batch))
        pool = ThreadPoolExecutor(workers) if workers > 1 else None
        try:
            if pool is None:
                resized = [self.resize(image, name=name) for image, name in zip(batch, names)]
            else:
                resized = list(pool.map(lambda item: self.resize(item[0], name=item[1]), zip(batch, names)))
            P = self.patch_size
            grids = [(1, a.shape[0] // P, a.shape[1] // P) for a in resized]
            bounds = np.cumsum([0] + [t * h * w for t, h, w in grids]).tolist()
            pixel_values = torch.empty(bounds[-1], self.patch_dim, dtype=torch.float32)
            rows = pixel_values.numpy()

            def write(index: int) -> None:
                patchify_into(
                    rows[bounds[index] : bounds[index + 1]],
                    resized[index][None],
                    self._scale,
                    self._bias,
                    patch_size=P,
                    temporal_patch_size=self.temporal_patch_size,
                    merge_size=self.merge_size,
                )

            if pool is None:
                for index in range(len(resized)):
                    write(index)
            else:
                list(pool.map(write, range(len(resized))))
        finally:
            if pool is not None:
                pool.shutdown()
        return {"pixel_values": pixel_values, "image_grid_thw": torch.tensor(grids, dtype=torch.int64)}
