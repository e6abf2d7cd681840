"""Parity of ``VisionTransformer`` with transformers' Qwen3-VL and Qwen3-VL-MoE vision towers (float64)."""

from __future__ import annotations

import pytest
import torch
from _tower_helpers import GRIDS, hf_qwen3_vl_tower, ours_from, random_pixels, randomize, tiny_config

from vl_vision import VisionConfig, VisionTransformer

pytest.importorskip("transformers")


def _assert_same(hf_out, ours_out, atol: float = 1e-8) -> None:
    torch.testing.assert_close(ours_out.merged, hf_out.pooler_output, rtol=0, atol=atol)
    assert len(ours_out.deepstack) == len(hf_out.deepstack_features) > 0
    for got, want in zip(ours_out.deepstack, hf_out.deepstack_features, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=atol)
    torch.testing.assert_close(ours_out.last_hidden_state, hf_out.last_hidden_state, rtol=0, atol=atol)


@pytest.mark.parametrize("moe", [False, True], ids=["qwen3_vl", "qwen3_vl_moe"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_matches_transformers_float64(moe: bool, backend: str) -> None:
    cfg = tiny_config(attn_implementation=backend)
    hf = hf_qwen3_vl_tower(cfg, moe=moe)  # transformers' eager softmax runs in float32 even for float64
    randomize(hf, seed=1)
    ours = ours_from(hf, cfg)
    x = random_pixels(cfg, GRIDS)
    with torch.no_grad():
        want = hf(x, grid_thw=GRIDS)
        got = ours(x, GRIDS)
    assert got.merged.shape == (int(GRIDS.prod(-1).sum()) // 4, cfg.out_hidden_size)
    _assert_same(want, got)


@pytest.mark.parametrize(
    "grid",
    [[[1, 2, 2]], [[1, 2, 30]], [[4, 10, 2]], [[1, 14, 6], [1, 14, 6], [2, 14, 6]]],
    ids=["single-block", "wide", "tall-video", "same-size-batch"],
)
def test_matches_transformers_more_grids(grid: list[list[int]]) -> None:
    cfg = tiny_config(deepstack_visual_indexes=[2], depth=3, num_heads=4)
    hf = hf_qwen3_vl_tower(cfg)
    randomize(hf, seed=2)
    ours = ours_from(hf, cfg)
    g = torch.tensor(grid)
    x = random_pixels(cfg, g, seed=3)
    with torch.no_grad():
        _assert_same(hf(x, grid_thw=g), ours(x, g))


def test_state_dict_keys_equal_transformers() -> None:
    cfg = tiny_config()
    hf = hf_qwen3_vl_tower(cfg)
    ours = VisionTransformer(cfg)
    assert set(ours.state_dict()) == set(hf.state_dict())
    for key, value in hf.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key
    assert ours.state_dict()["patch_embed.proj.weight"].shape == (32, 3, 2, 4, 4)


def test_from_hf_config_builds_loadable_tower() -> None:
    cfg = tiny_config()
    hf = hf_qwen3_vl_tower(cfg)
    mapped = VisionConfig.from_hf(hf.config)
    assert mapped.depth == cfg.depth and mapped.deepstack_visual_indexes == cfg.deepstack_visual_indexes
    VisionTransformer(mapped).load_state_dict(hf.state_dict(), strict=True)


def test_float32_close_to_transformers() -> None:
    cfg = tiny_config()
    hf = hf_qwen3_vl_tower(cfg)
    randomize(hf, seed=4)
    hf = hf.float()
    ours = ours_from(hf, cfg).float()
    x = random_pixels(cfg, GRIDS, dtype=torch.float32)
    with torch.no_grad():
        _assert_same(hf(x, grid_thw=GRIDS), ours(x, GRIDS), atol=2e-5)
