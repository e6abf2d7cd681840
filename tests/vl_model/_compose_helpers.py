"""Tiny parts for the compose tests: LM configs of three families, a vision config, inputs."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config
from transformers.configuration_utils import PreTrainedConfig

from vl_model.compose import ComposedVLForConditionalGeneration, compose
from vl_vision import VisionConfig

VOCAB = 300
IMAGE, VIDEO, VSTART, VEND = 250, 251, 252, 253
TOKEN_IDS = {
    "image_token_id": IMAGE,
    "video_token_id": VIDEO,
    "vision_start_token_id": VSTART,
    "vision_end_token_id": VEND,
}
FAMILIES = ("qwen3", "qwen2", "llama")


def lm_config(family: str = "qwen3", hidden: int = 32, layers: int = 2, tie: bool = False) -> PreTrainedConfig:
    """A tiny causal-LM config of one family (2 heads, 1 KV head, head dim 16)."""
    common: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "tie_word_embeddings": tie,
        "max_position_embeddings": 256,
    }
    if family == "qwen3":
        return Qwen3Config(head_dim=hidden // 2, **common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "llama":
        return LlamaConfig(head_dim=hidden // 2, **common)
    raise ValueError(family)


def vision_config(out: int = 32, deepstack: tuple[int, ...] = (0, 1)) -> VisionConfig:
    """Depth 2, width 32, 4 px patches, 8 x 8 position table."""
    return VisionConfig(
        depth=2,
        hidden_size=32,
        num_heads=2,
        intermediate_size=64,
        out_hidden_size=out,
        deepstack_visual_indexes=list(deepstack),
        patch_size=4,
        num_position_embeddings=64,
    )


def tiny_model(family: str = "qwen3", *, tie: bool = False, seed: int = 0) -> ComposedVLForConditionalGeneration:
    """A composed model in eval mode."""
    torch.manual_seed(seed)
    return compose(vision_config(), lm_config(family, tie=tie), **TOKEN_IDS).eval()


def image_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two rows, one image each: grids (1, 4, 4) -> 4 tokens and (1, 4, 6) -> 6 tokens."""
    g = torch.Generator().manual_seed(seed)
    row0 = [1, 2, 3, VSTART] + [IMAGE] * 4 + [VEND, 4, 5, 6, 7]
    row1 = [1, VSTART] + [IMAGE] * 6 + [VEND, 8, 9, 10, 11]
    return {
        "input_ids": torch.tensor([row0, row1]),
        "attention_mask": torch.ones(2, len(row0), dtype=torch.long),
        "pixel_values": torch.randn(16 + 24, 96, generator=g),
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 6]]),
    }


def video_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """One row: a video (grid (2, 4, 4) -> 8 tokens) before an image (grid (1, 4, 4) -> 4 tokens)."""
    g = torch.Generator().manual_seed(seed)
    row = [1, VSTART] + [VIDEO] * 8 + [VEND, 5, VSTART] + [IMAGE] * 4 + [VEND, 6]
    return {
        "input_ids": torch.tensor([row]),
        "pixel_values": torch.randn(16, 96, generator=g),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "pixel_values_videos": torch.randn(32, 96, generator=g),
        "video_grid_thw": torch.tensor([[2, 4, 4]]),
    }


def qwen3_vl_twin(model: ComposedVLForConditionalGeneration) -> Any:
    """transformers' ``Qwen3VLForConditionalGeneration`` with the weights of a composed Qwen3 + MRoPE model."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    lm, vc = model.language_model.config, model.visual.config
    text = {
        key: getattr(lm, key)
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "rms_norm_eps",
        )
    }
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": lm.rope_parameters["rope_theta"],
        "mrope_section": model.config.mrope_section,
        "mrope_interleaved": True,
    }
    vision = {k: v for k, v in vc.to_dict().items() if k in _QWEN3_VL_VISION_FIELDS}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **TOKEN_IDS)
    twin = Qwen3VLForConditionalGeneration(config).eval()
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("visual."):
            state["model." + key] = value
        elif key.startswith("language_model.model."):
            state["model.language_model." + key.removeprefix("language_model.model.")] = value
        else:
            state[key.removeprefix("language_model.")] = value
    twin.load_state_dict(state, strict=True)
    return twin


_QWEN3_VL_VISION_FIELDS = (
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
)
