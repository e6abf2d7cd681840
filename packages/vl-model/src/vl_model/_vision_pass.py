"""One vision-tower pass per forward: images and videos together, a zero-weighted placeholder when none.

Both VLM classes encode their visual inputs here. Images and videos go through the tower in one call
(their patches concatenated; the tower's attention stays inside each image and temporal patch, so the
outputs equal two separate calls up to float rounding) and are split back afterwards.

Why one pass, and why a placeholder: when the tower is sharded (FSDP2, ``vl_train.parallel``), every
forward of a tower block gathers the block's parameters from all ranks, and every backward
reduce-scatters its gradients. Ranks must therefore run the tower the same number of times in the same
order, whatever their data holds. A rank with a text-only micro-batch would skip the tower, and a rank
with images and videos would run it twice: gloo then fails with "Received data size doesn't match",
NCCL hangs (transformers#37186, QwenLM/Qwen3-VL#126). With ``uniform_vision_pass`` on (set by
``vl_train.parallel.parallelize``), a fresh forward without pixels encodes one placeholder image of
``m x m`` zero patches instead, and returns ``anchor``: ``0 x`` the sum of every tower output, which the
model adds to its input embeddings. The loss, and every gradient, is unchanged (each tower parameter
receives an exact zero), yet every FSDP unit of the tower runs forward and backward on every rank.

Notation: ``N`` patches, ``n`` images/videos, ``m`` spatial merge size, ``H`` LLM width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vl_vision import VisionOutput, VisionTransformer

__all__ = ["VisualFeatures", "encode_visual", "placeholder_inputs"]


@dataclass
class VisualFeatures:
    """The tower's outputs for one forward.

    Attributes:
        images: Merged tokens ``[N_img / m^2, H]`` and DeepStack features of all images, or ``None``.
        videos: The same for all videos, or ``None``.
        anchor: A zero scalar that depends on every output of a placeholder pass (add it to the input
            embeddings), or ``None`` when no placeholder ran.
    """

    images: VisionOutput | None = None
    videos: VisionOutput | None = None
    anchor: torch.Tensor | None = None


def _split(out: VisionOutput, merged_counts: list[int], patch_counts: list[int]) -> list[VisionOutput]:
    merged = torch.split(out.merged, merged_counts)
    deepstack = [torch.split(f, merged_counts) for f in out.deepstack]
    hidden = torch.split(out.last_hidden_state, patch_counts) if out.last_hidden_state is not None else None
    return [
        VisionOutput(
            merged=merged[i],
            deepstack=[f[i] for f in deepstack],
            last_hidden_state=hidden[i] if hidden is not None else None,
        )
        for i in range(len(merged_counts))
    ]


def placeholder_inputs(
    tower: VisionTransformer, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels [m^2, C*T*P*P] of zeros, grid [[1, m, m]])``: the smallest image the tower accepts."""
    config = tower.config
    m = int(config.spatial_merge_size)
    pixels = torch.zeros(m * m, int(config.patch_dim), device=device, dtype=dtype)
    return pixels, torch.tensor([[1, m, m]], device=device)


def encode_visual(
    tower: VisionTransformer,
    pixel_values: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    pixel_values_videos: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    *,
    placeholder: bool = False,
) -> VisualFeatures:
    """Encode the images and videos of one forward in a single tower call (see the module docstring).

    Args:
        tower: A ``vl_vision.VisionTransformer`` (``config.spatial_merge_size``, ``config.patch_dim``, ``dtype``).
        pixel_values: ``[N_img, C*T*P*P]`` image patches, with ``image_grid_thw [n_img, 3]`` (or both None).
        image_grid_thw: The images' grids.
        pixel_values_videos: ``[N_vid, C*T*P*P]`` video patches, with ``video_grid_thw [n_vid, 3]``.
        video_grid_thw: The videos' grids.
        placeholder: Without any pixels, run a zero-weighted placeholder image and return its ``anchor``.

    Returns:
        The per-modality outputs (``None`` for a modality without pixels) and the anchor.
    """
    kinds = [
        (pixels, grid)
        for pixels, grid in ((pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw))
        if pixels is not None and grid is not None
    ]
    dtype = tower.dtype
    if not kinds:
        if not placeholder:
            return VisualFeatures()
        device = next(tower.parameters()).device
        out = tower(*placeholder_inputs(tower, device, dtype))
        total = out.merged.float().sum() + sum((f.float().sum() for f in out.deepstack), torch.zeros((), device=device))
        return VisualFeatures(anchor=total * 0.0)
    unit = int(tower.config.spatial_merge_size) ** 2
    patch_counts = [int(pixels.shape[0]) for pixels, _ in kinds]
    merged_counts = [int(grid.long().prod(-1).sum()) // unit for _, grid in kinds]
    if len(kinds) == 1:
        parts = [tower(kinds[0][0].to(dtype), kinds[0][1])]
    else:
        pixels = torch.cat([p.to(dtype) for p, _ in kinds])
        grids = torch.cat([g.to(kinds[0][1].device) for _, g in kinds])
        parts = _split(tower(pixels, grids), merged_counts, patch_counts)
    images = parts[0] if pixel_values is not None and image_grid_thw is not None else None
    videos = parts[-1] if pixel_values_videos is not None and video_grid_thw is not None else None
    return VisualFeatures(images=images, videos=videos)
