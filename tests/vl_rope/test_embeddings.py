"""cos/sin of RoPE, MRoPE (interleaved and chunked, with YaRN), GLM3DRoPE and VisionRoPE2D.

Each is compared with transformers' rotary embedding (fp32, max abs error < 1e-5;
in practice bit-equal) and with a float64 evaluation of REFERENCE.md's formulas.
"""

from __future__ import annotations

import pytest
import torch

from vl_rope import (
    GLM3DRoPE,
    MRoPE,
    RoPE,
    RopeScaling,
    VisionRoPE2D,
    mrope_axis_of_frequency,
    vision_position_ids,
)


def _positions(seed: int, batch: int = 2, length: int = 37, high: int = 8192) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, (3, batch, length), generator=g)


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-5) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert (ours.float() - ref.float()).abs().max().item() < atol


# ---------------------------------------------------------------- formulas (no transformers needed)


def test_axis_maps_follow_reference() -> None:
    inter = mrope_axis_of_frequency([24, 20, 20], interleaved=True).tolist()
    assert inter[:6] == [0, 1, 2, 0, 1, 2] and inter[57:60] == [0, 1, 2] and inter[60:] == [0, 0, 0, 0]
    assert [inter.count(a) for a in range(3)] == [24, 20, 20]
    chunked = mrope_axis_of_frequency([16, 24, 24], interleaved=False).tolist()
    assert chunked == [0] * 16 + [1] * 24 + [2] * 24


@pytest.mark.parametrize("interleaved", [True, False])
def test_mrope_equals_float64_formula(interleaved: bool) -> None:
    section = [24, 20, 20] if interleaved else [16, 24, 24]
    mrope = MRoPE(128, 5e6, section, interleaved=interleaved)
    pos = _positions(0, high=2000)
    cos, sin = mrope(pos)
    axis = mrope_axis_of_frequency(section, interleaved)
    inv = 5e6 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    angle = pos.permute(1, 2, 0)[..., axis].double() * inv
    # float32 angles of positions < 2000 lose ~1e-4 rad at most; the formula is the point, not the ulps
    torch.testing.assert_close(cos.double(), torch.cat((angle, angle), -1).cos(), atol=3e-4, rtol=0)
    torch.testing.assert_close(sin.double(), torch.cat((angle, angle), -1).sin(), atol=3e-4, rtol=0)


def test_text_positions_reduce_to_1d_rope() -> None:
    """With equal T/H/W positions MRoPE is plain 1-D RoPE, whatever the layout."""
    pos = torch.arange(50)[None].expand(2, -1)
    ref = RoPE(128, 5e6)(pos)
    for inter, sec in ((True, [24, 20, 20]), (False, [16, 24, 24])):
        got = MRoPE(128, 5e6, sec, interleaved=inter)(pos)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_vision_positions_in_merge_block_order() -> None:
    pos = vision_position_ids(torch.tensor([[1, 2, 4]]), 2)
    # blocks (0,0),(0,1): rows/cols inside each 2x2 block first
    assert pos.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    video = vision_position_ids(torch.tensor([[3, 2, 2]]), 2)
    assert video.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]] * 3


def test_vision_rope_formula() -> None:
    rope = VisionRoPE2D(64, theta=10000.0)
    grid = torch.tensor([[1, 6, 4], [2, 2, 2]])
    cos, _ = rope(grid)
    pos = vision_position_ids(grid, 2).double()
    inv = 10000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    half = torch.cat((pos[:, :1] * inv, pos[:, 1:] * inv), -1)
    torch.testing.assert_close(cos.double(), torch.cat((half, half), -1).cos(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MRoPE(128, 5e6, [24, 20, 21]), "sums to 65"),
        (lambda: MRoPE(64, 5e6, [0, 16, 16]), "cannot be laid out"),
        (lambda: MRoPE(128, 5e6, [64]), "three non-negative"),
        (lambda: GLM3DRoPE(128, 1e4, [8, 12, 12], partial_rotary_factor=1.0), "has 64 frequencies"),
        (lambda: RoPE(64, 1e4, partial_rotary_factor=0.0), "partial_rotary_factor"),
        (lambda: RoPE(64, -1.0), "theta must be positive"),
        (lambda: VisionRoPE2D(66), "divisible by 4"),
    ],
)
def test_bad_construction(build, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_position_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[3, B, L\].*\(4, 2, 5\)"):
        MRoPE(128)(torch.zeros(4, 2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        RoPE(64)(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        VisionRoPE2D(64).from_positions(torch.zeros(5, 3, dtype=torch.long))


# ---------------------------------------------------------------- parity with transformers


@pytest.fixture(scope="module")
def tf():  # type: ignore[no-untyped-def]
    return pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default"},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144},
        {"rope_type": "linear", "factor": 2.0},
    ],
)
def test_interleaved_mrope_equals_qwen3vl(tf, rope_parameters: dict) -> None:  # type: ignore[no-untyped-def]
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    params = {"rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True, **rope_parameters}
    config = tf.Qwen3VLTextConfig(head_dim=128, hidden_size=256, num_attention_heads=2, rope_parameters=params)
    ref_cos, ref_sin = Qwen3VLTextRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), _positions(1))
    mrope = MRoPE(128, 5e6, [24, 20, 20], scaling=RopeScaling.from_hf(params, max_position_embeddings=262144))
    cos, sin = mrope(_positions(1))
    _assert_close(cos, ref_cos)
    _assert_close(sin, ref_sin)


def test_chunked_mrope_equals_qwen2vl(tf) -> None:  # type: ignore[no-untyped-def]
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    params = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    config = tf.Qwen2VLTextConfig(hidden_size=1024, num_attention_heads=8, rope_parameters=params)
    pos = torch.randint(0, 8192, (3, 8, 8192), generator=torch.Generator().manual_seed(2))
    ref_cos, ref_sin = Qwen2VLRotaryEmbedding(config)(torch.zeros(1), pos)
    cos, sin = MRoPE(128, 1e6, [16, 24, 24], interleaved=False)(pos)
    _assert_close(cos, ref_cos)
    _assert_close(sin, ref_sin)


def test_glm_3d_rope_equals_glm4v(tf) -> None:  # type: ignore[no-untyped-def]
    from transformers.models.glm4v import modeling_glm4v as glm

    params = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12], "partial_rotary_factor": 0.5}
    config = tf.Glm4vTextConfig(hidden_size=512, num_attention_heads=4, head_dim=128, rope_parameters=params)
    pos = _positions(3)
    ref_cos, ref_sin = glm.Glm4vTextRotaryEmbedding(config)(torch.zeros(1), pos)
    cos, sin = GLM3DRoPE(128, 10000.0, [8, 12, 12], partial_rotary_factor=0.5)(pos)
    _assert_close(cos, ref_cos)
    _assert_close(sin, ref_sin)


def test_rope_1d_equals_llama_all_scalings(tf) -> None:  # type: ignore[no-untyped-def]
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    pos = torch.randint(0, 16000, (2, 64), generator=torch.Generator().manual_seed(4))
    for params in (
        {"rope_type": "default"},
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    ):
        full = {"rope_theta": 1e6, **params}
        config = tf.LlamaConfig(
            hidden_size=512, num_attention_heads=4, head_dim=128, max_position_embeddings=8192, rope_parameters=full
        )
        ref_cos, ref_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), pos)
        ours = RoPE(128, 1e6, RopeScaling.from_hf(full, max_position_embeddings=8192))
        cos, sin = ours(pos)
        _assert_close(cos, ref_cos)
        _assert_close(sin, ref_sin)


def test_vision_rope_equals_qwen3vl(tf) -> None:  # type: ignore[no-untyped-def]
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionRotaryEmbedding
    from transformers.vision_utils import get_vision_position_ids

    g = torch.Generator().manual_seed(5)
    grids = torch.cat((torch.randint(1, 4, (6, 1), generator=g), 2 * torch.randint(1, 7, (6, 2), generator=g)), 1)
    config = tf.Qwen3VLVisionConfig(hidden_size=128, num_heads=2)  # head_dim 64
    ref_pos = get_vision_position_ids(grids, 2)
    ref_cos, ref_sin = Qwen3VLVisionRotaryEmbedding(config)(torch.zeros(1), ref_pos)
    assert torch.equal(vision_position_ids(grids, 2), ref_pos)
    cos, sin = VisionRoPE2D(64, spatial_merge_size=2)(grids)
    _assert_close(cos, ref_cos)
    _assert_close(sin, ref_sin)
