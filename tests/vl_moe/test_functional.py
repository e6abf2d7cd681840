"""moe_experts / torch path: parity with a float64 reference (values and gradients), both grouped-matmul
code paths, determinism, edge cases (empty experts, k=1, k=E), bad inputs, backend dispatch."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from vl_moe import moe_experts, moe_experts_reference, resolve_backend, torch_moe_experts
from vl_moe._grouped import grouped_mm_supported

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _inputs(
    tokens: int, hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype = torch.float64, seed: int = 0
) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    logits = torch.randn(tokens, experts, generator=g, dtype=torch.float64)
    weights, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    w_gate_up = torch.randn(experts, 2 * inter, hidden, generator=g, dtype=torch.float64) / hidden**0.5
    w_down = torch.randn(experts, hidden, inter, generator=g, dtype=torch.float64) / inter**0.5
    return x.to(dtype), weights.to(dtype), ids, w_gate_up.to(dtype), w_down.to(dtype)


def _value_and_grads(fn: object, inputs: Inputs, upstream: torch.Tensor) -> list[torch.Tensor]:
    x, w, ids, gu, d = (t.detach().clone() for t in inputs)
    leaves = [x, w, gu, d]
    for t in leaves:
        t.requires_grad_(True)
    out = fn(x, w, ids, gu, d)  # type: ignore[operator]
    grads = torch.autograd.grad(out, leaves, upstream.to(out.dtype))
    return [out.detach(), *grads]


NAMES = ["out", "d_x", "d_weights", "d_gate_up", "d_down"]


@pytest.mark.parametrize(
    ("tokens", "hidden", "inter", "experts", "top_k"),
    [(1, 8, 4, 3, 1), (13, 12, 5, 6, 2), (31, 16, 8, 8, 4), (7, 9, 3, 4, 4)],
)
@pytest.mark.parametrize("use_grouped_mm", [None, False])
def test_float64_matches_reference(
    tokens: int, hidden: int, inter: int, experts: int, top_k: int, use_grouped_mm: bool | None
) -> None:
    inputs = _inputs(tokens, hidden, inter, experts, top_k, seed=tokens)
    upstream = torch.randn(tokens, hidden, dtype=torch.float64)
    got = _value_and_grads(lambda *a: torch_moe_experts(*a, use_grouped_mm=use_grouped_mm), inputs, upstream)
    want = _value_and_grads(moe_experts_reference, inputs, upstream)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("use_grouped_mm", [None, False])
@pytest.mark.parametrize(("tokens", "top_k"), [(37, 3), (64, 8)])
def test_float32_both_paths_match_reference(tokens: int, top_k: int, use_grouped_mm: bool | None) -> None:
    inputs = _inputs(tokens, 32, 16, 8, top_k, seed=5)
    f32 = tuple(t.float() if t.is_floating_point() else t for t in inputs)
    assert grouped_mm_supported(f32[0], f32[3].transpose(1, 2))  # aligned sizes: the grouped_mm path runs
    upstream = torch.randn(tokens, 32, dtype=torch.float64)
    got = _value_and_grads(lambda *a: torch_moe_experts(*a, use_grouped_mm=use_grouped_mm), f32, upstream)  # type: ignore[arg-type]
    want = _value_and_grads(moe_experts_reference, inputs, upstream)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-6, msg=name)


def test_bfloat16_error_is_bfloat16_rounding() -> None:
    inputs = _inputs(48, 64, 32, 8, 2, seed=7)
    bf = tuple(t.bfloat16() if t.is_floating_point() else t for t in inputs)
    upstream = torch.randn(48, 64, dtype=torch.float64)
    got = _value_and_grads(torch_moe_experts, bf, upstream)  # type: ignore[arg-type]
    want = _value_and_grads(moe_experts_reference, inputs, upstream)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == torch.bfloat16
        err = (a.double() - b).abs().max() / b.abs().max()
        assert err < 2e-2, f"{name}: relative error {float(err):.3g}"


def test_experts_without_tokens_get_zero_gradient() -> None:
    x, w, _, gu, d = _inputs(10, 8, 4, 6, 2)
    ids = torch.tensor([[0, 2]] * 5 + [[2, 5]] * 5)  # experts 1, 3, 4 unused
    upstream = torch.randn(10, 8, dtype=torch.float64)
    for use in (None, False):
        got = _value_and_grads(
            lambda *a, use=use: torch_moe_experts(*a, use_grouped_mm=use), (x, w, ids, gu, d), upstream
        )
        want = _value_and_grads(moe_experts_reference, (x, w, ids, gu, d), upstream)
        for name, a, b in zip(NAMES, got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
        assert got[3][[1, 3, 4]].abs().max() == 0 and got[4][[1, 3, 4]].abs().max() == 0


def test_deterministic_bitwise() -> None:
    inputs = _inputs(50, 16, 8, 4, 2, dtype=torch.float32)
    upstream = torch.randn(50, 16)
    first = _value_and_grads(torch_moe_experts, inputs, upstream)
    for _ in range(2):
        again = _value_and_grads(torch_moe_experts, inputs, upstream)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_gradcheck() -> None:
    x, w, ids, gu, d = _inputs(6, 5, 3, 4, 2)
    for t in (x, w, gu, d):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c, e: moe_experts(a, b, ids, c, e, backend="torch"), (x, w, gu, d))


def test_routing_weights_in_float32_with_bfloat16_tokens() -> None:
    x, w, ids, gu, d = _inputs(9, 16, 8, 4, 2, dtype=torch.bfloat16)
    out = moe_experts(x, w.float(), ids, gu, d, backend="torch")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, moe_experts(x, w, ids, gu, d, backend="torch"))


def test_bad_inputs_raise() -> None:
    x, w, ids, gu, d = _inputs(5, 8, 4, 3, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"w_down must be \[E, H, I\] = \(3, 8, 4\).*got \(3, 8, 5\)"):
        moe_experts(x, w, ids, gu, torch.randn(3, 8, 5))
    with pytest.raises(ValueError, match=r"H = x's hidden size 8, got H = 7"):
        moe_experts(x, w, ids, torch.randn(3, 8, 7), d)
    with pytest.raises(ValueError, match=r"topk_ids must be \[T, k\] with T = 5.*got \(4, 2\)"):
        moe_experts(x, w[:4], ids[:4], gu, d)
    with pytest.raises(ValueError, match=r"same shape \[T, k\], got \(5, 1\) and \(5, 2\)"):
        moe_experts(x, w[:, :1], ids, gu, d)
    with pytest.raises(ValueError, match=r"top_k \(4\) must be <= num_experts \(3\)"):
        moe_experts(x, torch.rand(5, 4), torch.zeros(5, 4, dtype=torch.int64), gu, d)
    with pytest.raises(ValueError, match=re.escape("w_gate_up has dtype torch.bfloat16 but x has dtype torch.float32")):
        moe_experts(x, w, ids, gu.bfloat16(), d)
    with pytest.raises(ValueError, match=re.escape("w_down has dtype torch.float64 but x has dtype torch.float32")):
        moe_experts(x, w, ids, gu, d.double())
    with pytest.raises(ValueError, match=re.escape("integer dtype, got torch.float32")):
        moe_experts(x, w, ids.float(), gu, d)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\) for 3 experts, got values in \[0, 3\]"):
        moe_experts(x, w, torch.full_like(ids, 3).index_fill_(0, torch.tensor([0]), 0), gu, d)
    with pytest.raises(ValueError, match=r"x must be \[T, H\] \(2-D\), got shape \(1, 5, 8\)"):
        moe_experts(x[None], w, ids, gu, d)
    with pytest.raises(ValueError, match="backend must be one of"):
        moe_experts(x, w, ids, gu, d, backend="cuda")


def test_auto_backend_resolution() -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    triton_there = __import__("importlib").util.find_spec("triton") is not None
    assert resolve_backend("auto", torch.device("cuda")) == ("triton" if triton_there else "torch")


def test_grouped_mm_support_check() -> None:
    a = torch.randn(10, 16)
    assert not grouped_mm_supported(a.double())
    assert not grouped_mm_supported(torch.randn(10, 13))  # 52-byte rows: not 16-byte aligned
    assert not grouped_mm_supported(torch.randn(10, 17)[:, 1:])  # misaligned base pointer


def test_importing_vl_moe_does_not_import_the_kernels() -> None:
    code = "import sys, vl_moe; assert 'vl_moe.kernels' not in sys.modules and 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_triton_backend_matches_torch(triton_device: str) -> None:
    pytest.importorskip("vl_moe.kernels")
    x, w, ids, gu, d = (t.to(triton_device) for t in _inputs(12, 32, 16, 4, 2, dtype=torch.float32))
    upstream = torch.randn(12, 32, device=triton_device)
    got = _value_and_grads(lambda *a: moe_experts(*a, backend="triton"), (x, w, ids, gu, d), upstream)
    want = _value_and_grads(lambda *a: moe_experts(*a, backend="torch"), (x, w, ids, gu, d), upstream)
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
