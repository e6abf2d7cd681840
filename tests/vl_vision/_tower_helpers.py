"""Tiny tower configs, random patch inputs, and transformers reference towers built from the same weights."""

from __future__ import annotations

from typing import Any

import torch

from vl_vision import VisionConfig, VisionTransformer

# grids: odd merged sizes (6x10 -> 3x5 blocks, 2x14 -> 1x7), videos with t > 1, one of each shape twice
GRIDS = torch.tensor([[1, 6, 10], [2, 2, 14], [1, 4, 4], [3, 6, 10], [1, 4, 4], [2, 8, 6]])


def tiny_config(**overrides: Any) -> VisionConfig:
    """A 3-block tower, width 32, 2 heads (head dim 16), patch 4, 6x6 position table."""
    base: dict[str, Any] = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        patch_size=4,
        temporal_patch_size=2,
        out_hidden_size=40,
        num_position_embeddings=36,
        deepstack_visual_indexes=[0, 1],
    )
    base.update(overrides)
    return VisionConfig(**base)


def random_pixels(
    config: VisionConfig, grid: torch.Tensor, dtype: torch.dtype = torch.float64, seed: int = 0
) -> torch.Tensor:
    """Random patches ``[sum t*h*w, C*T*P*P]``."""
    n = int(grid.prod(-1).sum())
    return torch.randn(n, config.patch_dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (norms and biases included) random values, so no part is trivially the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise * (0.1 if p.dim() > 1 else 0.05))


def hf_qwen3_vl_tower(config: VisionConfig, moe: bool = False, attn: str = "sdpa") -> torch.nn.Module:
    """transformers' ``Qwen3VLVisionModel`` (or the MoE family's) with our config's sizes, float64, eval."""
    if moe:
        from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeVisionConfig as Cfg
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel as Model
    else:
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig as Cfg
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as Model
    fields = [
        "depth",
        "hidden_size",
        "hidden_act",
        "intermediate_size",
        "num_heads",
        "in_channels",
        "patch_size",
        "spatial_merge_size",
        "temporal_patch_size",
        "out_hidden_size",
        "num_position_embeddings",
        "deepstack_visual_indexes",
        "initializer_range",
    ]
    hf_cfg = Cfg(**{f: getattr(config, f) for f in fields})
    hf_cfg._attn_implementation = attn
    model = Model(hf_cfg).to(torch.float64).eval()
    return model


def ours_from(hf_model: torch.nn.Module, config: VisionConfig) -> VisionTransformer:
    """Our tower loaded strictly from a transformers tower's state dict (float64, eval)."""
    ours = VisionTransformer(config).to(torch.float64).eval()
    ours.load_state_dict(hf_model.state_dict(), strict=True)
    return ours
