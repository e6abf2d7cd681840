"""apply_rotary: against a complex-number float64 rotation and transformers' apply functions."""

from __future__ import annotations

import pytest
import torch

from vl_rope import GLM3DRoPE, MRoPE, VisionRoPE2D, apply_rotary


def _complex_reference(x: torch.Tensor, angle: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate pairs as complex numbers z * e^{i angle} in float64 (RoFormer eq. 12-13).

    ``angle`` holds one angle per pair, ``[..., R/2]`` broadcastable to x's leading dims.
    """
    x = x.double()
    r = angle.shape[-1] * 2
    rot, rest = x[..., :r], x[..., r:]
    if style == "neox":
        a, b = rot[..., : r // 2], rot[..., r // 2 :]
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
    z = torch.complex(a, b) * torch.polar(torch.ones_like(angle.double()), angle.double())
    if style == "neox":
        out = torch.cat((z.real, z.imag), -1)
    else:
        out = torch.stack((z.real, z.imag), -1).flatten(-2)
    return torch.cat((out, rest), -1)


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("rot_dims", [64, 32])
def test_matches_complex_rotation(style: str, rot_dims: int) -> None:
    g = torch.Generator().manual_seed(0)
    b, hq, hk, length, d = 2, 4, 2, 7, 64
    q = torch.randn(b, hq, length, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hk, length, d, generator=g, dtype=torch.float64)
    angle = torch.rand(b, length, rot_dims // 2, generator=g, dtype=torch.float64) * 100
    if style == "neox":
        full = torch.cat((angle, angle), -1)
    else:
        full = angle.repeat_interleave(2, -1)
    q2, k2 = apply_rotary(q, k, full.cos(), full.sin(), style=style)  # type: ignore[arg-type]
    torch.testing.assert_close(q2, _complex_reference(q, angle[:, None], style), atol=1e-12, rtol=0)
    torch.testing.assert_close(k2, _complex_reference(k, angle[:, None], style), atol=1e-12, rtol=0)


def test_rotation_keeps_norm_and_relative_angle() -> None:
    """<R(p) q, R(s) k> depends only on p - s: the property RoPE exists for."""
    mrope = MRoPE(64, 1e4, [16, 8, 8])
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 64, generator=g), torch.randn(1, 1, 1, 64, generator=g)
    scores = []
    for shift in (0, 100, 1000):
        pq = torch.full((3, 1, 1), 7 + shift)
        pk = torch.full((3, 1, 1), 3 + shift)
        rq, _ = apply_rotary(q, q, *mrope(pq))
        rk, _ = apply_rotary(k, k, *mrope(pk))
        scores.append((rq * rk).sum().item())
        torch.testing.assert_close(rq.norm(), q.norm())
    assert max(scores) - min(scores) < 1e-4


def test_layouts_and_dtypes() -> None:
    g = torch.Generator().manual_seed(2)
    cos, sin = MRoPE(64, 1e4, [16, 8, 8])(torch.randint(0, 500, (3, 2, 5), generator=g))
    q = torch.randn(2, 5, 3, 64, generator=g)  # [B, L, H, D]
    ref_q, _ = apply_rotary(q.transpose(1, 2), q.transpose(1, 2), cos, sin)
    got_q, _ = apply_rotary(q, q, cos, sin, unsqueeze_dim=2)
    torch.testing.assert_close(got_q.transpose(1, 2), ref_q)
    bq, bk = apply_rotary(q.bfloat16(), q.half(), cos, sin, unsqueeze_dim=2)
    assert bq.dtype == torch.bfloat16 and bk.dtype == torch.float16
    torch.testing.assert_close(bq.float(), got_q, atol=0.05, rtol=0.02)
    up, _ = apply_rotary(q.bfloat16(), q.bfloat16(), cos, sin, unsqueeze_dim=2, upcast=True)
    torch.testing.assert_close(up.float(), got_q, atol=0.02, rtol=0.01)


@pytest.mark.parametrize(
    ("cos_shape", "sin_shape", "match"),
    [((2, 5, 64), (2, 5, 32), "same shape"), ((2, 5, 96), (2, 5, 96), "rotary dims"), ((2, 5, 6), (2, 5, 6), "")],
)
def test_bad_shapes(cos_shape: tuple, sin_shape: tuple, match: str) -> None:
    q = torch.randn(2, 3, 5, 64)
    cos, sin = torch.randn(cos_shape), torch.randn(sin_shape)
    if not match:  # 6 is fine (partial rotary); an odd count is not
        apply_rotary(q, q, cos, sin)
        cos, sin, match = torch.randn(2, 5, 7), torch.randn(2, 5, 7), "must be even"
    with pytest.raises(ValueError, match=match):
        apply_rotary(q, q, cos, sin)
    with pytest.raises(ValueError, match="style"):
        apply_rotary(q, q, cos[..., :4], sin[..., :4], style="rotate")  # type: ignore[arg-type]


# ---------------------------------------------------------------- transformers


def test_equals_transformers_text_vision_and_glm() -> None:
    pytest.importorskip("transformers")
    from transformers.models.glm4v.modeling_glm4v import apply_rotary_pos_emb as glm_apply
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb, apply_rotary_pos_emb_vision

    g = torch.Generator().manual_seed(3)
    pos = torch.randint(0, 4000, (3, 2, 9), generator=g)
    q, k = torch.randn(2, 8, 9, 128, generator=g), torch.randn(2, 2, 9, 128, generator=g)
    cos, sin = MRoPE(128, 5e6, [24, 20, 20])(pos)
    for ours, ref in zip(apply_rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        assert torch.equal(ours, ref)
    # bf16 text path: both compute in bf16
    qb, kb, cb, sb = q.bfloat16(), k.bfloat16(), cos.bfloat16(), sin.bfloat16()
    for ours, ref in zip(apply_rotary(qb, kb, cb, sb), apply_rotary_pos_emb(qb, kb, cb, sb), strict=True):
        assert torch.equal(ours, ref)

    vq = torch.randn(40, 4, 64, generator=g, dtype=torch.bfloat16)
    vcos, vsin = VisionRoPE2D(64)(torch.tensor([[1, 4, 6], [1, 2, 8]]))
    ours_v = apply_rotary(vq, vq, vcos, vsin, upcast=True)
    for ours, ref in zip(ours_v, apply_rotary_pos_emb_vision(vq, vq, vcos, vsin), strict=True):
        assert torch.equal(ours, ref)

    gcos, gsin = GLM3DRoPE(128, 1e4, [8, 12, 12], partial_rotary_factor=0.5)(pos)
    ours_g = apply_rotary(q, k, gcos, gsin, style="gptj")
    for ours, ref in zip(ours_g, glm_apply(q, k, gcos, gsin), strict=True):
        assert torch.equal(ours, ref)
