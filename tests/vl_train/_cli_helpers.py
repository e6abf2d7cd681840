"""Tiny random VLMs, prompt batches and recipe files for the stage, CLI, distillation and teacher tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 96
VISION_START, VISION_END, IMAGE, VIDEO = 90, 91, 92, 93
EOS = 2
PATCH = 4
PATCH_DIM = 3 * 2 * PATCH * PATCH


def tiny_vlm(seed: int = 0, hidden: int = 32, layers: int = 2) -> Any:
    """A random fp32 ``VLForConditionalGeneration`` (vocabulary 96, patch 4) in eval mode."""
    from vl_model import VLConfig, VLForConditionalGeneration

    text = {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 512,
        "eos_token_id": EOS,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    }
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "patch_size": PATCH,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": hidden,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    }
    config = VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    torch.manual_seed(seed)
    model = VLForConditionalGeneration(config)
    with torch.no_grad():  # larger weights than the init so that the distributions differ visibly
        for name, p in model.named_parameters():
            if not ("norm" in name and name.endswith("weight")):
                p.copy_(0.1 * torch.randn_like(p))
    return model.float().eval()


def prompt_batch(seed: int = 0, left_pad: int = 2) -> dict[str, torch.Tensor]:
    """Two left-padded prompts; the first holds a 1x4x4 image (4 merged tokens)."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, 80, (n,), generator=g).tolist()
    r0 = text(3) + [VISION_START] + [IMAGE] * 4 + [VISION_END] + text(4)
    r1 = text(len(r0) - left_pad)
    width = len(r0)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    ids[0], mask[0] = torch.tensor(r0), 1
    ids[1, left_pad:], mask[1, left_pad:] = torch.tensor(r1), 1
    grid = torch.tensor([[1, 4, 4]])
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": (ids == IMAGE).long(),
        "pixel_values": torch.randn(16, PATCH_DIM, generator=g),
        "image_grid_thw": grid,
    }


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
