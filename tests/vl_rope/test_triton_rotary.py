"""Parity of the fused Triton rotary (forward and backward) with the torch ``apply_rotary``.

Runs on CPU through Triton's interpreter (``TRITON_INTERPRET=1`` set before the
kernels are first imported), so shapes stay tiny; one GPU test uses a real shape.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from vl_rope import triton_rotary
from vl_rope.apply import apply_rotary
from vl_rope.triton_rotary import apply_rotary_fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tolerances for one rounding of a float32 result to the dtype (one ulp, relative) plus float32 noise.
TOL = {
    torch.float32: {"rtol": 1e-6, "atol": 1e-6},
    torch.float16: {"rtol": 2**-10, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2**-7, "atol": 1e-5},
}


def _tensor(*shape: int, dtype: torch.dtype, gen: torch.Generator, device: str = DEVICE) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _angles(
    tokens: tuple[int, ...], rot: int, style: str, dtype: torch.dtype, gen: torch.Generator, device: str = DEVICE
):
    """cos/sin in the layout a RoPE module produces: ``cat(f, f)`` (neox) or ``repeat_interleave(2)`` (gptj)."""
    f = torch.rand(*tokens, rot // 2, generator=gen) * 20.0
    emb = torch.cat((f, f), dim=-1) if style == "neox" else f.repeat_interleave(2, dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def _inputs(layout: str, b: int, hq: int, hk: int, seq: int, d: int, dtype: torch.dtype, gen: torch.Generator):
    """``(q, k, token_shape, unsqueeze_dim)`` for ``layout`` in ``bhld`` / ``blhd`` / ``nhd``."""
    if layout == "bhld":
        return _tensor(b, hq, seq, d, dtype=dtype, gen=gen), _tensor(b, hk, seq, d, dtype=dtype, gen=gen), (b, seq), 1
    if layout == "blhd":
        return _tensor(b, seq, hq, d, dtype=dtype, gen=gen), _tensor(b, seq, hk, d, dtype=dtype, gen=gen), (b, seq), 2
    return _tensor(seq, hq, d, dtype=dtype, gen=gen), _tensor(seq, hk, d, dtype=dtype, gen=gen), (seq,), 1


def _check_parity(q, k, cos, sin, *, style: str, unsqueeze_dim: int, gen: torch.Generator) -> None:
    """Forward outputs and input gradients of fused vs the float32 torch reference rounded to the dtype."""
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    gq = torch.randn(q.shape, generator=gen).to(q)
    gk = torch.randn(k.shape, generator=gen).to(k)
    out_q, out_k = apply_rotary_fused(q, k, cos, sin, style=style, unsqueeze_dim=unsqueeze_dim)
    torch.autograd.backward((out_q, out_k), (gq, gk))

    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    ref_q, ref_k = apply_rotary(q32, k32, cos.float(), sin.float(), style=style, unsqueeze_dim=unsqueeze_dim)
    torch.autograd.backward((ref_q, ref_k), (gq.float(), gk.float()))

    for got, want in ((out_q, ref_q), (out_k, ref_k), (q.grad, q32.grad), (k.grad, k32.grad)):
        assert got is not None and want is not None
        assert got.dtype == q.dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.to(q.dtype).float(), **TOL[q.dtype])


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("layout", ["bhld", "blhd", "nhd"])
@pytest.mark.parametrize("partial", [False, True])
def test_parity_fp32(style: str, layout: str, partial: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    d = 16
    rot = d // 2 if partial else d
    q, k, tokens, ud = _inputs(layout, 2, 4, 2, 7, d, torch.float32, gen)
    cos, sin = _angles(tokens, rot, style, torch.float32, gen)
    _check_parity(q, k, cos, sin, style=style, unsqueeze_dim=ud, gen=gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("style", "layout", "partial"), [("neox", "bhld", False), ("gptj", "blhd", True)])
def test_parity_half(dtype: torch.dtype, style: str, layout: str, partial: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    d = 32
    rot = d // 2 if partial else d
    q, k, tokens, ud = _inputs(layout, 2, 4, 2, 7, d, dtype, gen)
    cos, sin = _angles(tokens, rot, style, dtype, gen)
    _check_parity(q, k, cos, sin, style=style, unsqueeze_dim=ud, gen=gen)


def test_float32_angles_with_bf16_inputs() -> None:
    gen = torch.Generator().manual_seed(2)
    q, k, tokens, ud = _inputs("bhld", 1, 4, 2, 5, 16, torch.bfloat16, gen)
    cos, sin = _angles(tokens, 16, "neox", torch.float32, gen)
    _check_parity(q, k, cos, sin, style="neox", unsqueeze_dim=ud, gen=gen)


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_non_contiguous_transposed_q(style: str) -> None:
    """q/k as ``[B, H, L, D]`` transposes of ``[B, L, H, D]`` projections; gradients land in the originals."""
    gen = torch.Generator().manual_seed(3)
    q = _tensor(2, 7, 4, 16, dtype=torch.float32, gen=gen).transpose(1, 2)
    k = _tensor(2, 7, 2, 16, dtype=torch.float32, gen=gen).transpose(1, 2)
    assert not q.is_contiguous()
    cos, sin = _angles((2, 7), 16, style, torch.float32, gen)
    _check_parity(q, k, cos, sin, style=style, unsqueeze_dim=1, gen=gen)
    out_q, _ = apply_rotary_fused(q, k, cos, sin, style=style)
    assert out_q.stride() == q.stride()  # dense inputs keep their layout


def test_non_dense_slices_of_fused_qkv() -> None:
    gen = torch.Generator().manual_seed(4)
    b, seq, hq, hk, d = 2, 7, 4, 2, 16
    qkv = _tensor(b, seq, (hq + 2 * hk) * d, dtype=torch.float32, gen=gen).requires_grad_()
    q = qkv[..., : hq * d].view(b, seq, hq, d)
    k = qkv[..., hq * d : (hq + hk) * d].view(b, seq, hk, d)
    cos, sin = _angles((b, seq), d, "neox", torch.float32, gen)
    out_q, out_k = apply_rotary_fused(q, k, cos, sin, unsqueeze_dim=2)
    (out_q.square().sum() + out_k.sum()).backward()
    grad = qkv.grad
    qkv.grad = None
    ref_q, ref_k = apply_rotary(q, k, cos, sin, unsqueeze_dim=2)
    (ref_q.square().sum() + ref_k.sum()).backward()
    torch.testing.assert_close(out_q, ref_q, **TOL[torch.float32])
    torch.testing.assert_close(out_k, ref_k, **TOL[torch.float32])
    torch.testing.assert_close(grad, qkv.grad, **TOL[torch.float32])


@pytest.mark.parametrize(("hq", "hk", "d", "rot"), [(3, 1, 24, 12), (40, 8, 256, 256)])
def test_non_power_of_two_dims_and_many_heads(hq: int, hk: int, d: int, rot: int) -> None:
    """Masked tails (R/2 and D - R not powers of two) and more heads than one tile (the head loop)."""
    gen = torch.Generator().manual_seed(10)
    q, k, tokens, ud = _inputs("blhd", 1, hq, hk, 2, d, torch.float32, gen)
    cos, sin = _angles(tokens, rot, "gptj", torch.float32, gen)
    _check_parity(q, k, cos, sin, style="gptj", unsqueeze_dim=ud, gen=gen)


def test_cos_broadcast_over_batch() -> None:
    gen = torch.Generator().manual_seed(5)
    q, k, _, ud = _inputs("bhld", 3, 4, 2, 6, 8, torch.float32, gen)
    cos, sin = _angles((1, 6), 8, "gptj", torch.float32, gen)
    _check_parity(q, k, cos, sin, style="gptj", unsqueeze_dim=ud, gen=gen)


def test_no_grad_and_grad_of_k_only() -> None:
    gen = torch.Generator().manual_seed(6)
    q, k, tokens, _ = _inputs("bhld", 1, 2, 2, 3, 8, torch.float32, gen)
    cos, sin = _angles(tokens, 8, "neox", torch.float32, gen)
    with torch.no_grad():
        out_q, out_k = apply_rotary_fused(q, k.requires_grad_(), cos, sin)
    assert not out_q.requires_grad and not out_k.requires_grad
    out_q, out_k = apply_rotary_fused(q, k, cos, sin)
    assert not out_q.requires_grad and out_k.requires_grad
    out_k.sum().backward()
    assert k.grad is not None and q.grad is None


def test_cos_requiring_grad_falls_back_to_torch() -> None:
    gen = torch.Generator().manual_seed(7)
    q, k, tokens, _ = _inputs("bhld", 1, 2, 2, 3, 8, torch.float32, gen)
    cos, sin = _angles(tokens, 8, "neox", torch.float32, gen)
    cos.requires_grad_()
    apply_rotary_fused(q, k, cos, sin)[0].sum().backward()
    grad = cos.grad
    cos.grad = None
    apply_rotary(q, k, cos, sin)[0].sum().backward()
    torch.testing.assert_close(grad, cos.grad)


def _bad(**over):
    gen = torch.Generator().manual_seed(8)
    args = {
        "q": _tensor(1, 2, 3, 8, dtype=torch.float32, gen=gen),
        "k": _tensor(1, 2, 3, 8, dtype=torch.float32, gen=gen),
        "cos": _tensor(1, 3, 8, dtype=torch.float32, gen=gen),
        "sin": _tensor(1, 3, 8, dtype=torch.float32, gen=gen),
    }
    kwargs = {key: over.pop(key) for key in ("style", "unsqueeze_dim") if key in over}
    args.update(over)
    return apply_rotary_fused(args["q"], args["k"], args["cos"], args["sin"], **kwargs)


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"sin": torch.zeros(1, 3, 6)}, "cos and sin must have the same shape"),
        ({"cos": torch.zeros(1, 3, 10), "sin": torch.zeros(1, 3, 10)}, "must be <= head dim"),
        ({"cos": torch.zeros(1, 3, 7), "sin": torch.zeros(1, 3, 7)}, "rotary dim must be even"),
        ({"k": torch.zeros(1, 2, 3, 16)}, "same head dim"),
        ({"k": torch.zeros(1, 2, 4, 8)}, "differ outside the head dim"),
        ({"cos": torch.zeros(2, 3, 8), "sin": torch.zeros(2, 3, 8)}, "do not broadcast"),
        ({"q": torch.zeros(1, 2, 8), "k": torch.zeros(1, 2, 8)}, "do not broadcast"),
        ({"q": torch.zeros(2, 8), "k": torch.zeros(2, 8)}, "must both be 3-D"),
        ({"style": "rope"}, "style must be 'neox' or 'gptj'"),
        ({"unsqueeze_dim": 3}, "unsqueeze_dim=3"),
        ({"q": torch.zeros(1, 2, 3, 8, dtype=torch.float64)}, "float32, float16 or bfloat16"),
    ],
)
def test_bad_inputs(over: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _bad(**over)


def test_missing_triton_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_rotary, "HAS_TRITON", False)
    with pytest.raises(ImportError, match=r"pip install vl-rope\[triton\]"):
        _bad()


def test_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    kernels = triton_rotary._kernels()
    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _bad(**{name: _tensor(*shape, dtype=torch.float32, gen=torch.Generator(), device="cpu") for name, shape in (
            ("q", (1, 2, 3, 8)), ("k", (1, 2, 3, 8)), ("cos", (1, 3, 8)), ("sin", (1, 3, 8)))})  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_gpu_realistic_shape(style: str) -> None:
    gen = torch.Generator().manual_seed(9)
    q = _tensor(2, 512, 16, 128, dtype=torch.bfloat16, gen=gen, device="cuda").transpose(1, 2)
    k = _tensor(2, 4, 512, 128, dtype=torch.bfloat16, gen=gen, device="cuda")
    cos, sin = _angles((2, 512), 64, style, torch.bfloat16, gen, device="cuda")
    _check_parity(q, k, cos, sin, style=style, unsqueeze_dim=1, gen=gen)
