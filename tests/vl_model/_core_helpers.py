"""Tiny Qwen3-VL configs, random multimodal batches and transformers reference models for the core tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 300
VISION_START, VISION_END, IMAGE, VIDEO = 251, 252, 253, 254
PATCH = 4
PATCH_DIM = 3 * 2 * PATCH * PATCH


def hf_config_dict(moe: bool = False, **text_overrides: Any) -> dict[str, Any]:
    """A tiny official-style ``qwen3_vl`` (or ``qwen3_vl_moe``) config as a dict."""
    text: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
    }
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1)
        text["mlp_only_layers"] = [1]
    text.update(text_overrides)
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": PATCH,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": 64,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0, 1],
    }
    return {
        "text_config": text,
        "vision_config": vision,
        "image_token_id": IMAGE,
        "video_token_id": VIDEO,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
        "tie_word_embeddings": False,
    }


def hf_model(moe: bool = False, seed: int = 0, tie: bool = False, **text_overrides: Any) -> torch.nn.Module:
    """A transformers ``Qwen3VL(Moe)ForConditionalGeneration`` with random (non-trivial) fp32 weights, in eval."""
    import transformers

    torch.manual_seed(seed)
    data = hf_config_dict(moe, **text_overrides) | {"tie_word_embeddings": tie}
    if moe:
        cfg = transformers.Qwen3VLMoeConfig(**data)
        model = transformers.Qwen3VLMoeForConditionalGeneration(cfg)
    else:
        cfg = transformers.Qwen3VLConfig(**data)
        model = transformers.Qwen3VLForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.float().eval()


def save_hf(model: torch.nn.Module, path: Path, **kwargs: Any) -> Path:
    model.save_pretrained(str(path), **kwargs)
    return path


def _vision_run(token: int, n: int) -> list[int]:
    return [VISION_START] + [token] * n + [VISION_END]


def batch(images: bool = True, videos: bool = True, left_pad: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows (the second left-padded) with an image in each row and a 2-temporal-patch video in row 0."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(1, 240, (n,), generator=g).tolist()
    rows: list[list[int]] = []
    image_grids: list[list[int]] = []
    video_grids: list[list[int]] = []
    # row 0: text, image (1x4x6 -> 6 tokens), text, video 2x4x4 (two temporal patches of 4 tokens), text
    r0 = text(4)
    if images:
        r0 += _vision_run(IMAGE, 6) + text(3)
        image_grids.append([1, 4, 6])
    if videos:
        r0 += text(2) + _vision_run(VIDEO, 4) + text(2) + _vision_run(VIDEO, 4)
        video_grids.append([2, 4, 4])
    r0 += text(5)
    r1 = text(3)
    if images:
        r1 += _vision_run(IMAGE, 4) + text(2)
        image_grids.append([1, 4, 4])
    r1 += text(5)
    rows = [r0, r1]
    width = max(len(r0), len(r1) + left_pad)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    out: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    out["mm_token_type_ids"] = ((ids == IMAGE).long() + 2 * (ids == VIDEO).long()) * mask
    if image_grids:
        grid = torch.tensor(image_grids)
        out["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g)
        out["image_grid_thw"] = grid
    if video_grids:
        grid = torch.tensor(video_grids)
        out["pixel_values_videos"] = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g)
        out["video_grid_thw"] = grid
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def saved_hf(tmp_root: Path, moe: bool) -> tuple[torch.nn.Module, Path]:
    """A reference model and the folder transformers saved it to (safetensors)."""
    ref = hf_model(moe)
    folder = tmp_root / ("qwen3_vl_moe" if moe else "qwen3_vl")
    ref.save_pretrained(str(folder))
    return ref, folder


def masked(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The logits of real (non-padding) tokens, ``[N, V]``."""
    return logits[attention_mask.bool()]
