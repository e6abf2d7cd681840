"""Parity of the GLM-4.1V/4.5V configuration of ``VisionTransformer`` with transformers' ``Glm4vVisionModel``.

The GLM parts (post-conv RMSNorm, bicubic position table, RMSNorm + SwiGLU blocks, 2x2 conv
downsample, SwiGLU merger) are switched on by ``VisionConfig.from_hf``; weights come over through
``glm4v_to_ours``. Everything runs in float64 and must agree to 1e-8.

transformers' tower returns ``pooler_output`` = the merger output (our ``merged``) and
``last_hidden_state`` = the downsample output (before the merger); ``hidden_states`` holds the
embedding and the outputs of all blocks but the last. It must be called with one grid row per frame: its position
embedding indexes ``grid_thw`` by attention segment (one per frame), so a ``t > 1`` row fails
inside it; ``Glm4vModel.get_video_features`` flattens video grids to ``[1, h, w]`` rows for
that reason. Our tower takes either form and gives the same result.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _tower_helpers import random_pixels, randomize

from vl_vision import VisionConfig, VisionTransformer, glm4v_to_ours, ours_to_glm4v, strip_visual_prefix

pytest.importorskip("transformers")

# images with odd merged sizes (6x10 -> 3x5 blocks, 2x14 -> 1x7), one shape twice, a t = 2 video
GRID = torch.tensor([[1, 6, 10], [2, 2, 14], [1, 4, 4], [1, 6, 10], [2, 6, 10], [1, 2, 2]])


def _per_frame(grid: torch.Tensor) -> torch.Tensor:
    """Each ``[t, h, w]`` row as ``t`` rows ``[1, h, w]`` (what ``Glm4vModel`` feeds its tower)."""
    hw = torch.repeat_interleave(grid[:, 1:], grid[:, 0], dim=0)
    return torch.cat((torch.ones_like(hw[:, :1]), hw), dim=1)


def _hf_tower(moe: bool = False, **overrides: Any) -> torch.nn.Module:
    """transformers' GLM-4V (or GLM-4.5V MoE family) vision tower at a tiny size, float64, random weights."""
    if moe:
        from transformers.models.glm4v_moe.configuration_glm4v_moe import Glm4vMoeVisionConfig as Cfg
        from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeVisionModel as Model
    else:
        from transformers.models.glm4v.configuration_glm4v import Glm4vVisionConfig as Cfg
        from transformers.models.glm4v.modeling_glm4v import Glm4vVisionModel as Model
    fields: dict[str, Any] = dict(
        depth=3,
        hidden_size=32,
        num_heads=2,
        intermediate_size=48,
        out_hidden_size=40,
        patch_size=4,
        image_size=24,  # a 6 x 6 position table
        temporal_patch_size=2,
        attention_bias=True,
    )
    fields.update(overrides)
    hf_cfg = Cfg(**fields)
    hf_cfg._attn_implementation = "sdpa"
    model = Model(hf_cfg).to(torch.float64).eval()
    randomize(model, seed=7)  # norms (RMSNorm, the merger's LayerNorm) get non-unit weights too
    return model


def _ours_from(hf: torch.nn.Module, **overrides: Any) -> VisionTransformer:
    cfg = VisionConfig.from_hf(hf.config, **overrides)
    ours = VisionTransformer(cfg).to(torch.float64).eval()
    ours.load_state_dict(glm4v_to_ours(hf.state_dict()), strict=True)
    return ours


@pytest.mark.parametrize("moe", [False, True], ids=["glm4v", "glm4v_moe"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_matches_transformers_float64(moe: bool, backend: str) -> None:
    hf = _hf_tower(moe)
    ours = _ours_from(hf, attn_implementation=backend)
    x = random_pixels(ours.config, GRID, seed=3)
    with torch.no_grad():
        want = hf(x, grid_thw=_per_frame(GRID), output_hidden_states=True)
        got = ours(x, GRID)
        blocks = ours.forward_intermediates(x, GRID)
        embedded = ours.embed(x, GRID)[0]
        assert got.last_hidden_state is not None
        downsampled = ours.downsample(ours.post_layernorm(got.last_hidden_state))  # type: ignore[misc]
    n_merged = int(GRID.prod(-1).sum()) // 4
    assert got.merged.shape == want.pooler_output.shape == (n_merged, 40)
    assert got.deepstack == []
    torch.testing.assert_close(got.merged, want.pooler_output, rtol=0, atol=1e-8)
    torch.testing.assert_close(downsampled, want.last_hidden_state, rtol=0, atol=1e-8)
    # hidden_states: the embedding, the outputs of all blocks but the last, then last_hidden_state
    assert len(want.hidden_states) == len(blocks) + 1 == 4
    for mine, theirs in zip([embedded, *blocks[:-1]], want.hidden_states[:-1], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-8)


def test_video_grid_equals_per_frame_grid() -> None:
    hf = _hf_tower()
    ours = _ours_from(hf)
    grid = torch.tensor([[3, 2, 6], [2, 6, 10]])
    x = random_pixels(ours.config, grid, seed=4)
    with torch.no_grad():
        want = hf(x, grid_thw=_per_frame(grid)).pooler_output
        by_video = ours(x, grid).merged
        by_frame = ours(x, _per_frame(grid)).merged
    torch.testing.assert_close(by_video, want, rtol=0, atol=1e-8)
    torch.testing.assert_close(by_frame, want, rtol=0, atol=1e-8)


@pytest.mark.parametrize("grid", [[[1, 2, 2]], [[1, 2, 30]], [[1, 14, 6], [1, 14, 6]]], ids=["block", "wide", "same"])
def test_matches_transformers_more_grids(grid: list[list[int]]) -> None:
    # 4 heads (head dim 8), no qkv bias, a 5 x 5 table: the other GLM settings
    hf = _hf_tower(num_heads=4, attention_bias=False, image_size=20)
    ours = _ours_from(hf)
    assert ours.config.num_position_embeddings == 25 and not ours.config.qkv_bias
    g = torch.tensor(grid)
    x = random_pixels(ours.config, g, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, g).merged, hf(x, grid_thw=g).pooler_output, rtol=0, atol=1e-8)


def test_float32_close_to_transformers() -> None:
    hf = _hf_tower().float()
    cfg = VisionConfig.from_hf(hf.config)
    ours = VisionTransformer(cfg).eval()
    ours.load_state_dict(glm4v_to_ours(hf.state_dict()), strict=True)
    x = random_pixels(cfg, GRID, dtype=torch.float32, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, GRID).merged, hf(x, grid_thw=_per_frame(GRID)).pooler_output, atol=2e-5, rtol=0
        )


def test_from_hf_switches_on_glm_parts() -> None:
    cfg = VisionConfig.from_hf(_hf_tower().config)
    assert (cfg.norm, cfg.mlp, cfg.position_interpolation, cfg.merger) == ("rmsnorm", "swiglu", "bicubic", "glm")
    assert cfg.post_conv_norm and cfg.norm_eps == 1e-5 and cfg.hidden_act == "silu"
    assert cfg.mlp_intermediate_size == cfg.out_hidden_size == 40 and cfg.intermediate_size == 48
    assert (cfg.mlp_bias, cfg.proj_bias, cfg.qkv_bias) == (False, False, True)
    assert cfg.num_position_embeddings == 36 and cfg.deepstack_visual_indexes == []


def test_from_hf_accepts_list_sizes() -> None:
    data = _hf_tower(depth=1).config.to_dict()
    data.update(image_size=[24, 24], patch_size=[4, 4], temporal_patch_size=[2, 2])
    cfg = VisionConfig.from_hf(data)
    assert (cfg.patch_size, cfg.temporal_patch_size, cfg.num_position_embeddings) == (4, 2, 36)
    data["image_size"] = [24, 32]
    with pytest.raises(ValueError, match="image_size"):
        VisionConfig.from_hf(data)


def test_state_dict_round_trip_gives_transformers_keys() -> None:
    hf = _hf_tower()
    theirs = hf.state_dict()
    ours = _ours_from(hf)
    assert "pos_embed.weight" in ours.state_dict() and "embeddings.position_embedding.weight" in theirs
    back = ours_to_glm4v(ours.state_dict())
    renamed = ["embeddings.position_embedding.weight" if k == "pos_embed.weight" else k for k in ours.state_dict()]
    assert list(back) == renamed  # order kept, only the one name changed
    assert set(back) == set(theirs)
    for key, value in theirs.items():
        assert back[key].shape == value.shape, key
        assert torch.equal(back[key], value), key
    assert glm4v_to_ours(ours_to_glm4v(ours.state_dict())).keys() == ours.state_dict().keys()
    hf.load_state_dict(back, strict=True)


def test_full_checkpoint_prefix() -> None:
    hf = _hf_tower(depth=1)
    full = {f"model.visual.{k}": v for k, v in hf.state_dict().items()}
    full["model.language_model.embed_tokens.weight"] = torch.zeros(2, 2)
    VisionTransformer(VisionConfig.from_hf(hf.config)).load_state_dict(
        glm4v_to_ours(strip_visual_prefix(full)), strict=True
    )
