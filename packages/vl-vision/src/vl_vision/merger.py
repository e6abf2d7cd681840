"""Patch merger and DeepStack of the Qwen3-VL vision tower.

``PatchMerger``: the ``m x m`` neighbouring patches of a merge block (consecutive rows,
thanks to the processor's merge-block order) are concatenated and projected to the
language model's width by a 2-layer MLP with GELU. The main merger normalises each patch
before the concat (pre-shuffle norm); each DeepStack merger normalises the concatenated
vector (post-shuffle norm) (Qwen3-VL, arXiv 2511.21631 section 2, "DeepStack").

``DeepStack``: features tapped after chosen ViT blocks go through their own mergers; the
language model adds them to its hidden states at the visual positions after its first
layers (DeepStack, arXiv 2406.04334; Qwen3-VL section 2). It is a ``ModuleList`` of
mergers, so the tower's keys stay ``deepstack_merger_list.{i}.*``, and it can tap any
layers of any encoder.

Notation: ``N`` patches, ``D`` ViT width, ``m`` merge size, ``E`` output width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["DeepStack", "PatchMerger"]


class PatchMerger(nn.Module):
    """``[N, D] -> [N / m^2, E]``: norm, concat of ``m x m`` patches, ``fc2(gelu(fc1(.)))``.

    Keys: ``norm.*`` (``[D]``, or ``[D m^2]`` with ``postshuffle_norm``), ``linear_fc1``
    ``[D m^2, D m^2]``, ``linear_fc2`` ``[E, D m^2]``.

    Args:
        dim: ViT width ``D``.
        out_dim: Output width ``E``.
        spatial_merge_size: ``m``.
        postshuffle_norm: Normalise after the concat (DeepStack mergers) instead of before.
        eps: LayerNorm epsilon.
    """

    def __init__(
        self, dim: int, out_dim: int, spatial_merge_size: int = 2, *, postshuffle_norm: bool = False, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.unit = spatial_merge_size**2
        self.merged_dim = dim * self.unit
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged_dim if postshuffle_norm else dim, eps=eps)
        self.linear_fc1 = nn.Linear(self.merged_dim, self.merged_dim)
        self.act = nn.GELU()
        self.linear_fc2 = nn.Linear(self.merged_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Merge ``[N, D]`` patches (``N`` divisible by ``m^2``) to ``[N / m^2, E]``."""
        if x.shape[0] % self.unit:
            raise ValueError(f"the merger needs a multiple of {self.unit} patches, got {x.shape[0]}")
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged_dim))
        else:
            x = self.norm(x).reshape(-1, self.merged_dim)
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class DeepStack(nn.ModuleList):
    """One post-shuffle ``PatchMerger`` per tapped layer.

    Args:
        layer_indexes: The layers (0-based block indexes) whose outputs are tapped, in order.
        dim: ViT width ``D``.
        out_dim: Output width ``E``.
        spatial_merge_size: ``m``.

    Example:
        >>> ds = DeepStack([1, 3], dim=32, out_dim=48)
        >>> feats = ds({1: torch.randn(8, 32), 3: torch.randn(8, 32)})
        >>> len(feats), tuple(feats[0].shape)
        (2, (2, 48))
    """

    def __init__(self, layer_indexes: Sequence[int], dim: int, out_dim: int, spatial_merge_size: int = 2) -> None:
        super().__init__(
            PatchMerger(dim, out_dim, spatial_merge_size, postshuffle_norm=True) for _ in range(len(layer_indexes))
        )
        self.layer_indexes = [int(i) for i in layer_indexes]

    def forward(self, features: Sequence[torch.Tensor] | Mapping[int, torch.Tensor]) -> list[torch.Tensor]:
        """Merge tapped features: a list aligned with ``layer_indexes`` or a ``{layer: [N, D]}`` map."""
        if isinstance(features, Mapping):
            missing = [i for i in self.layer_indexes if i not in features]
            if missing:
                raise ValueError(f"DeepStack taps layers {self.layer_indexes} but got no features for {missing}")
            feats = [features[i] for i in self.layer_indexes]
        else:
            feats = list(features)
            if len(feats) != len(self):
                raise ValueError(f"DeepStack has {len(self)} mergers but got {len(feats)} features")
        return [merger(f) for merger, f in zip(self, feats)]

    def extra_repr(self) -> str:
        return f"layer_indexes={self.layer_indexes}"
