"""State-dict adapters between transformers' vision towers and ``VisionTransformer``.

Qwen3-VL / Qwen3-VL-MoE keys are already equal (only the ``model.visual.`` / ``visual.``
prefix of a full checkpoint is stripped). GLM-4.1V/4.5V keys differ in one name: its
position table ``embeddings.position_embedding.weight`` is our ``pos_embed.weight``.
Each adapter has its inverse (round trip tested).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["glm4v_to_ours", "ours_to_glm4v", "strip_visual_prefix"]

_GLM_RENAMES = {"embeddings.position_embedding.weight": "pos_embed.weight"}


def strip_visual_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision-tower entries of a full VLM checkpoint (``model.visual.*`` or ``visual.*``), prefix removed."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for prefix in ("model.visual.", "visual."):
            if key.startswith(prefix):
                out[key[len(prefix) :]] = value
                break
    return out


def glm4v_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``Glm4vVisionModel`` keys to ``VisionTransformer`` keys."""
    return {_GLM_RENAMES.get(k, k): v for k, v in state_dict.items()}


def ours_to_glm4v(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``glm4v_to_ours``."""
    inverse = {v: k for k, v in _GLM_RENAMES.items()}
    return {inverse.get(k, k): v for k, v in state_dict.items()}
