"""Patch flattening in merge-block order, fused with rescaling and mean/std normalisation.

Implements the input layout of the Qwen3-VL vision encoder (Qwen3-VL technical report,
arXiv 2511.21631, section 2; REFERENCE.md section 2): a clip of frames is cut into patches of
``T x P x P`` pixels (temporal patch x patch x patch); each patch becomes one row of
``C * T * P * P`` values ordered (channel, time, patch row, patch column); rows are ordered so
that the ``m x m`` patches one merged token covers are contiguous: (temporal patch, block row,
block column, row in block, column in block). A still image is its own frame repeated ``T`` times.

Notation: ``F`` frames, ``T`` temporal patch size, ``P`` patch size, ``m`` merge size,
``gt, gh, gw`` = ``F / T, H / P, W / P`` the patch grid, ``C`` channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def normalization(
    image_mean: Sequence[float], image_std: Sequence[float], rescale: float = 1.0 / 255.0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel affine map ``x * scale + bias`` equal to ``(x * rescale - mean) / std``.

    Args:
        image_mean: Mean per channel, on the rescaled ``[0, 1]`` range.
        image_std: Standard deviation per channel.
        rescale: Factor that brings stored values to ``[0, 1]``.

    Returns:
        ``(scale, bias)``, each float32 ``[C, 1, 1]``.

    Raises:
        ValueError: Mean and std lengths differ, a mean is not finite or a std not positive and finite
            (either would put NaN or infinity into every pixel value).
    """
    if len(image_mean) != len(image_std):
        raise ValueError(f"image_mean has {len(image_mean)} entries but image_std has {len(image_std)}")
    if not all(math.isfinite(s) and s > 0 for s in image_std):
        raise ValueError(f"image_std entries must be positive and finite, got {tuple(image_std)}")
    if not all(math.isfinite(m) for m in image_mean):
        raise ValueError(f"image_mean entries must be finite, got {tuple(image_mean)}")
    mean = np.asarray(image_mean, dtype=np.float64)
    std = np.asarray(image_std, dtype=np.float64)
    scale = (rescale / std).astype(np.float32).reshape(-1, 1, 1)
    bias = (-mean / std).astype(np.float32).reshape(-1, 1, 1)
    return scale, bias


def grid_of(
    num_frames: int, height: int, width: int, patch_size: int, temporal_patch_size: int
) -> tuple[int, int, int]:
    """Patch grid ``(gt, gh, gw)`` of ``num_frames`` frames of ``height x width`` (frames already padded)."""
    return num_frames // temporal_patch_size, height // patch_size, width // patch_size


def patchify_into(
    out: torch.Tensor | np.ndarray,
    frames: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    *,
    patch_size: int,
    temporal_patch_size: int,
    merge_size: int,
) -> None:
    """Write the normalised patch rows of one clip into ``out``.

    The clip is normalised once at frame size (float32 ``[F, C, H, W]``), then copied into the
    rows with one strided copy; a still image is broadcast over time instead of being duplicated.
    numpy releases the GIL during both passes, so clips can be patchified from several threads.

    Args:
        out: float32 ``[gt * gh * gw, C * T * P * P]`` destination rows (a slice of the batch
            output; a CPU tensor is written through its numpy view).
        frames: ``uint8 [F, H, W, C]`` frames; ``F`` is 1 (a still image, repeated ``T`` times) or a
            multiple of ``T``; ``H`` and ``W`` are multiples of ``P * m``.
        scale: float32 ``[C, 1, 1]`` from :func:`normalization`.
        bias: float32 ``[C, 1, 1]`` from :func:`normalization`.
        patch_size: ``P``.
        temporal_patch_size: ``T``.
        merge_size: ``m``.

    Raises:
        ValueError: The sizes are not multiples of the patch geometry or ``out`` has the wrong shape.
    """
    num_frames, height, width, channels = frames.shape
    P, T, m = patch_size, temporal_patch_size, merge_size
    still = num_frames == 1
    if (not still and num_frames % T) or height % (P * m) or width % (P * m):
        raise ValueError(
            f"frames of shape {tuple(frames.shape)} do not tile into temporal patches of {T} and blocks of "
            f"{P * m} x {P * m} pixels"
        )
    gt, gh, gw = grid_of(T if still else num_frames, height, width, P, T)
    rows, dim = gt * gh * gw, channels * T * P * P
    if tuple(out.shape) != (rows, dim):
        raise ValueError(f"output rows have shape {tuple(out.shape)} but the clip needs ({rows}, {dim})")
    dst = (out.numpy() if isinstance(out, torch.Tensor) else out).reshape(gt, gh // m, gw // m, m, m, channels, T, P, P)
    normed = np.empty((num_frames, channels, height, width), dtype=np.float32)
    np.multiply(frames.transpose(0, 3, 1, 2), scale, out=normed)
    normed += bias
    src = normed.reshape(num_frames, channels, gh // m, m, P, gw // m, m, P)
    if still:
        # (block row, block col, row in block, col in block, C, P, P), broadcast over T
        dst[0] = src[0].transpose(1, 4, 2, 5, 0, 3, 6)[:, :, :, :, :, None]
    else:
        # (gt, T, C, ...) -> (gt, block row, block col, row in block, col in block, C, T, P, P)
        dst[...] = src.reshape(gt, T, channels, gh // m, m, P, gw // m, m, P).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
