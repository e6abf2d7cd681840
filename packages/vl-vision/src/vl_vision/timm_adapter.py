"""Any timm ViT as the vision tower, behind ``VisionTransformer``'s interface (optional extra).

``TimmVisionTower`` takes the processor's packed patches ``(pixel_values [N, C*T*P*P],
grid_thw [n, 3])`` like ``VisionTransformer`` and returns the same ``VisionOutput``, so a
timm encoder (DINOv2, SigLIP, EVA, CLIP, ... any ``timm.models.VisionTransformer``) can
stand in for the Qwen3-VL tower (arXiv 2511.21631 section 2). Per call it:

1. rebuilds each image / temporal slice ``[C, H, W]`` from the merge-block-ordered rows
   (row ``[C, T, P, P]``, rows ordered ``(t, h/m, w/m, m, m)``, see
   ``processing/_patchify.py``) and collapses the ``T`` frames of a temporal patch (see
   ``temporal_reduce``);
2. runs timm's patch embedding, position embedding (resampled to each size by
   ``dynamic_img_size=True``) and blocks, batching slices of equal size, through the public
   ``forward_intermediates(x, indices=..., norm=False, output_fmt="NLC", intermediates_only=True)``,
   which drops the prefix (class / register) tokens;
3. puts the raster-ordered tokens back into merge-block order and applies our ``PatchMerger``
   (after timm's final ``norm``) and a ``DeepStack`` merger per tapped block.

Attention stays inside each slice, as in our tower. timm is imported lazily: install it with
``pip install 'vl-vision[timm]'`` (timm needs torchvision).

Notation: ``N`` patches, ``n`` images/videos, ``C`` channels, ``T`` temporal patch, ``P`` patch,
``m`` merge size, ``(t, h, w)`` patch grid, ``D`` timm width, ``E`` output width.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from ._checks import check_inputs
from .merger import DeepStack, PatchMerger
from .tower import VisionOutput

__all__ = ["TimmVisionTower", "create_timm_model", "patches_to_frames", "raster_to_blocks"]

TemporalReduce = Literal["mean", "first"]


def create_timm_model(name: str, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, dynamic_img_size=True, num_classes=0, ...)`` with a clear error without timm.

    Args:
        name: A timm model name (e.g. ``"vit_base_patch16_siglip_224"``).
        pretrained: Load timm's pretrained weights (downloads them).
        **kwargs: More ``timm.create_model`` arguments; they override the two defaults.

    Raises:
        ImportError: timm (or the torchvision it needs) cannot be imported.
    """
    try:
        # optional dependency, imported on use so that vl-vision works without it
        timm = importlib.import_module("timm")
    except ImportError as err:
        raise ImportError(
            f"TimmVisionTower('{name}') needs timm: pip install 'vl-vision[timm]' "
            f"(timm also needs torchvision); the import failed with: {err}"
        ) from err
    options: dict[str, Any] = {"dynamic_img_size": True, "num_classes": 0}
    options.update(kwargs)
    model: nn.Module = timm.create_model(name, pretrained=pretrained, **options)
    return model


def _side(value: Any, what: str) -> int:
    """A square size from an int or an ``(a, a)`` pair."""
    sizes = {int(v) for v in value} if isinstance(value, Sequence) else {int(value)}
    if len(sizes) != 1:
        raise ValueError(f"{what} = {value}: only square patches are supported")
    return sizes.pop()


def patches_to_frames(
    rows: torch.Tensor, grid: Sequence[int], *, channels: int, patch_size: int, temporal_patch_size: int, merge: int
) -> torch.Tensor:
    """The rows of one image/video back to pixels: ``[t*h*w, C*T*P*P] -> [t, T, C, h*P, w*P]``."""
    t, h, w = (int(v) for v in grid)
    c, tp, p, m = channels, temporal_patch_size, patch_size, merge
    x = rows.reshape(t, h // m, w // m, m, m, c, tp, p, p)
    # (t, block row, block col, row in block, col in block, C, T, P, P) -> (t, T, C, h/m, m, P, w/m, m, P)
    return x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t, tp, c, h * p, w * p)


def raster_to_blocks(tokens: torch.Tensor, h: int, w: int, merge: int) -> torch.Tensor:
    """``[B, h*w, D]`` row-major tokens to ``[B*h*w, D]`` rows in merge-block order."""
    b, _, d = tokens.shape
    m = merge
    return tokens.reshape(b, h // m, m, w // m, m, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, d)


class TimmVisionTower(nn.Module):
    """A timm ViT trunk + our merger and DeepStack: ``(pixel_values, grid_thw) -> VisionOutput``.

    Keys: ``trunk.*`` (the timm model's own keys), ``merger.*``, ``deepstack_merger_list.{i}.*``.

    Args:
        model: A timm ``VisionTransformer`` built with ``dynamic_img_size=True``, or a timm model
            name (built by ``create_timm_model``).
        out_hidden_size: Width ``E`` of the merged tokens (the language model's width).
        spatial_merge_size: ``m``.
        temporal_patch_size: ``T``, frames per row of ``pixel_values``.
        deepstack_visual_indexes: timm blocks (0-based; negative count from the end) whose outputs
            feed DeepStack mergers.
        patch_size: Our ``P``; ``None`` takes timm's. It must equal timm's patch size.
        temporal_reduce: How the ``T`` frames of a temporal patch become the one frame a 2-D ViT
            sees: ``"mean"`` (for images, whose ``T`` frames are copies, the image itself; for
            video, exactly what a 3-D patch embedding inflated from timm's 2-D one by ``W / T``
            per frame computes) or ``"first"`` (the first frame).
        final_norm: Apply timm's final ``norm`` to the last block output before the merger (it
            is ``last_hidden_state``); DeepStack taps are raw block outputs, as in our tower.
        pretrained: With a name, load timm's pretrained weights.
        **create_kwargs: With a name, more ``timm.create_model`` arguments (``img_size``, ...).

    Raises:
        ValueError: timm's patch size differs from ``patch_size``, the model lacks
            ``dynamic_img_size``, or a DeepStack index is outside its blocks.
        ImportError: A name was given and timm cannot be imported.
    """

    def __init__(
        self,
        model: nn.Module | str,
        *,
        out_hidden_size: int,
        spatial_merge_size: int = 2,
        temporal_patch_size: int = 2,
        deepstack_visual_indexes: Sequence[int] = (),
        patch_size: int | None = None,
        temporal_reduce: TemporalReduce = "mean",
        final_norm: bool = True,
        pretrained: bool = False,
        **create_kwargs: Any,
    ) -> None:
        super().__init__()
        if isinstance(model, str):
            model = create_timm_model(model, pretrained=pretrained, **create_kwargs)
        elif create_kwargs or pretrained:
            raise ValueError("pretrained and timm.create_model arguments only apply when model is a name")
        for attr in ("patch_embed", "blocks", "embed_dim", "num_prefix_tokens", "forward_intermediates"):
            if not hasattr(model, attr):
                raise ValueError(f"model {type(model).__name__} has no {attr!r}: expected a timm VisionTransformer")
        if not getattr(model, "dynamic_img_size", False):
            raise ValueError(
                f"{type(model).__name__} was built with dynamic_img_size=False; the tower feeds images of any "
                "size, so create it with timm.create_model(name, dynamic_img_size=True)"
            )
        trunk: Any = model  # timm's attributes, checked above, are untyped
        timm_patch = _side(trunk.patch_embed.patch_size, "timm patch_embed.patch_size")
        if patch_size is not None and patch_size != timm_patch:
            raise ValueError(
                f"patch_size = {patch_size} but the timm model {type(model).__name__} cuts {timm_patch} x {timm_patch} "
                "patches; the processor's patch size must equal the encoder's"
            )
        if temporal_reduce not in ("mean", "first"):
            raise ValueError(f"temporal_reduce must be 'mean' or 'first', got {temporal_reduce!r}")
        self.trunk = model
        self.patch_size = timm_patch
        self.temporal_patch_size = temporal_patch_size
        self.spatial_merge_size = spatial_merge_size
        self.in_channels = int(getattr(model, "in_chans", 3))
        self.hidden_size = int(trunk.embed_dim)
        self.out_hidden_size = out_hidden_size
        self.temporal_reduce = temporal_reduce
        self.final_norm = final_norm
        self.depth = len(trunk.blocks)
        taps = self._resolve(list(deepstack_visual_indexes))
        if len(set(taps)) != len(taps):
            raise ValueError(f"deepstack_visual_indexes has duplicates: {list(deepstack_visual_indexes)}")
        self.merger = PatchMerger(self.hidden_size, out_hidden_size, spatial_merge_size)
        self.deepstack_merger_list = DeepStack(taps, self.hidden_size, out_hidden_size, spatial_merge_size)

    @property
    def patch_dim(self) -> int:
        """Width of one row of ``pixel_values``: ``C * T * P * P``."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def _resolve(self, indices: Sequence[int]) -> list[int]:
        out = []
        for i in indices:
            j = int(i) + self.depth if i < 0 else int(i)
            if not 0 <= j < self.depth:
                raise ValueError(f"block index {i} is outside the {self.depth} blocks of the timm model")
            out.append(j)
        return out

    # ------------------------------------------------------------------ layout

    def _frames(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
        """Per image/video, its slices as 2-D images ``[t, C, h*P, w*P]`` (``T`` frames collapsed)."""
        dtype = next(self.trunk.parameters()).dtype
        out = []
        for rows, g in zip(pixel_values.split(grid.prod(-1).tolist()), grid.tolist(), strict=True):
            clip = patches_to_frames(
                rows.to(dtype),
                g,
                channels=self.in_channels,
                patch_size=self.patch_size,
                temporal_patch_size=self.temporal_patch_size,
                merge=self.spatial_merge_size,
            )
            out.append(clip.mean(1) if self.temporal_reduce == "mean" else clip[:, 0])
        return out

    def _block_outputs(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, blocks: list[int]
    ) -> list[torch.Tensor]:
        """Raw outputs ``[N, D]`` (prefix tokens dropped, merge-block order) of the sorted unique ``blocks``."""
        grid = check_inputs(
            pixel_values,
            grid_thw,
            in_channels=self.in_channels,
            temporal_patch_size=self.temporal_patch_size,
            patch_size=self.patch_size,
            spatial_merge_size=self.spatial_merge_size,
        )
        frames = self._frames(pixel_values, grid)
        # slices of equal size share one timm batch; results go back to their image's place
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, h, w) in enumerate(grid.tolist()):
            groups.setdefault((h, w), []).append(i)
        per_clip: list[list[torch.Tensor]] = [[] for _ in range(len(frames))]
        trunk: Any = self.trunk
        for (h, w), members in groups.items():
            batch = torch.cat([frames[i] for i in members])
            feats = trunk.forward_intermediates(
                batch, indices=blocks, norm=False, stop_early=True, output_fmt="NLC", intermediates_only=True
            )
            if len(feats) != len(blocks) or feats[0].shape[1] != h * w:
                raise ValueError(
                    f"timm returned {len(feats)} features of {feats[0].shape[1]} tokens for blocks {blocks} of a "
                    f"{h} x {w} patch grid: expected {len(blocks)} of {h * w} (prefix tokens dropped)"
                )
            sizes = [int(grid[i, 0]) * h * w for i in members]
            split = [raster_to_blocks(f, h, w, self.spatial_merge_size).split(sizes) for f in feats]
            for k, i in enumerate(members):
                per_clip[i] = [s[k] for s in split]
        return [torch.cat([clip[j] for clip in per_clip]) for j in range(len(blocks))]

    # ------------------------------------------------------------------ forward

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> VisionOutput:
        """Encode the patches of ``n`` images/videos.

        Args:
            pixel_values: ``[N, C*T*P*P]`` patches in the processor's merge-block order.
            grid_thw: ``[n, 3]`` patch grid ``(t, h, w)`` of each image/video, ``h, w`` divisible by ``m``.

        Returns:
            ``VisionOutput(merged [N/m^2, E], deepstack [[N/m^2, E], ...], last_hidden_state [N, D])``.
        """
        taps = self.deepstack_merger_list.layer_indexes
        blocks = sorted({*taps, self.depth - 1})
        feats = dict(zip(blocks, self._block_outputs(pixel_values, grid_thw, blocks), strict=True))
        last = feats[self.depth - 1]
        if self.final_norm:
            norm = getattr(self.trunk, "norm", None)
            last = norm(last) if norm is not None else last  # per-token, so prefix tokens do not matter
        deepstack = self.deepstack_merger_list({i: feats[i] for i in taps}) if taps else []
        return VisionOutput(merged=self.merger(last), deepstack=deepstack, last_hidden_state=last)

    def forward_intermediates(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, indices: int | Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Raw block outputs ``[N, D]`` (merge-block order) after the chosen timm blocks.

        Args:
            pixel_values: ``[N, C*T*P*P]`` patches.
            grid_thw: ``[n, 3]`` grids.
            indices: Block indexes (negative count from the end), or an int ``k`` for the last
                ``k`` blocks, or ``None`` for every block.

        Returns:
            The features, in the order of ``indices``.
        """
        if indices is None:
            wanted = list(range(self.depth))
        elif isinstance(indices, int):
            if not 0 < indices <= self.depth:
                raise ValueError(f"indices = {indices}: the last-k count must be in [1, depth = {self.depth}]")
            wanted = list(range(self.depth - indices, self.depth))
        else:
            wanted = self._resolve(indices)
        if not wanted:
            return []
        blocks = sorted(set(wanted))
        feats = dict(zip(blocks, self._block_outputs(pixel_values, grid_thw, blocks), strict=True))
        return [feats[j] for j in wanted]

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, temporal_patch_size={self.temporal_patch_size}, "
            f"temporal_reduce={self.temporal_reduce}, final_norm={self.final_norm}"
        )
