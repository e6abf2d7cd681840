"""``VisionConfig``: defaults, validation, and the transformers mapping."""

from __future__ import annotations

import pytest
from _tower_helpers import tiny_config

from vl_vision import VisionConfig


def test_defaults_are_qwen3_vl() -> None:
    cfg = VisionConfig()
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.num_position_embeddings) == (
        27,
        1152,
        16,
        16,
        2304,
    )
    assert cfg.patch_dim == 1536 and cfg.head_dim == 72 and cfg.position_grid_side == 48
    assert cfg.deepstack_visual_indexes == [8, 16, 24]


def test_round_trip() -> None:
    cfg = tiny_config(attn_implementation="eager", rope_theta=500.0)
    assert VisionConfig.from_dict(cfg.to_dict()) == cfg
    assert VisionConfig.from_hf(cfg.to_dict()) == cfg


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        VisionConfig(4)  # type: ignore[misc]


def test_unknown_fields_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown VisionConfig fields \['num_layers'\]"):
        VisionConfig.from_dict({"num_layers": 3})
    with pytest.raises(ValueError, match="unknown vision config field 'window_size'"):
        VisionConfig.from_hf({"model_type": "qwen2_5_vl_vision", "window_size": 112})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 30, "num_heads": 4}, "hidden_size = 30 is not divisible by num_heads = 4"),
        ({"hidden_size": 24, "num_heads": 4}, "head dim = hidden_size / num_heads = 6 must be divisible by 4"),
        ({"num_position_embeddings": 40}, "num_position_embeddings = 40 must be a square"),
        ({"deepstack_visual_indexes": [5]}, r"deepstack_visual_indexes has 5, outside the 3 blocks"),
        ({"deepstack_visual_indexes": [1, 1]}, "duplicates"),
        ({"norm": "batchnorm"}, "VisionConfig.norm must be one of"),
        ({"attn_implementation": "xformers"}, "VisionConfig.attn_implementation must be one of"),
        ({"depth": 0}, "VisionConfig.depth must be a positive int, got 0"),
    ],
)
def test_validation(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_from_hf_qwen3_vl_and_glm() -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3VLVisionConfig(
        depth=4, deepstack_visual_indexes=[1, 3], rope_parameters={"rope_type": "axial", "rope_theta": 1234.0}
    )
    cfg = VisionConfig.from_hf(hf, attn_implementation="eager")
    assert cfg.depth == 4 and cfg.rope_theta == 1234.0 and cfg.attn_implementation == "eager"
    assert cfg.hidden_size == hf.hidden_size and cfg.out_hidden_size == hf.out_hidden_size
    glm = VisionConfig.from_hf(transformers.Glm4vVisionConfig())
    assert glm.merger == "glm" and glm.norm == "rmsnorm" and glm.mlp == "swiglu"
    assert glm.num_position_embeddings == (336 // 14) ** 2 and glm.norm_eps == 1e-5
    assert glm.mlp_intermediate_size == glm.out_hidden_size and glm.deepstack_visual_indexes == []
