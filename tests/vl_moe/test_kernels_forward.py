"""Forward of ``vl_moe.kernels.triton_moe_experts`` against a float64 torch reference written here.

Runs on CPU through Triton's interpreter (``TRITON_INTERPRET=1`` is set by ``tests/conftest.py``),
so shapes stay tiny; odd sizes (``H = 40``, ``I = 24``) exercise the tile masks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from vl_moe.kernels import KernelConfig, pick_config, triton_moe_experts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Max error relative to the reference's largest magnitude: float32 is exact up to summation order;
# the half types round h, the per-slot outputs and y once each (a few ulps of 2**-11 / 2**-8).
REL_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def reference(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """``y_t = sum_j w_tj * (silu(x W_g^T) * (x W_u^T)) W_d^T`` in float64, one gathered weight per pair."""
    x, weights, w_gate_up, w_down = (t.double() for t in (x, weights, w_gate_up, w_down))
    inter = w_down.shape[-1]
    gu = torch.einsum("th,tkoh->tko", x, w_gate_up[ids.long()])
    h = F.silu(gu[..., :inter]) * gu[..., inter:]
    return (weights[..., None] * torch.einsum("tki,tkhi->tkh", h, w_down[ids.long()])).sum(1)


def make_inputs(
    num_tokens: int,
    hidden: int,
    inter: int,
    num_experts: int,
    top_k: int,
    dtype: torch.dtype,
    routing: str = "balanced",
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """``(x, topk_weights, topk_ids, w_gate_up, w_down)`` on ``DEVICE``; weights are softmax-normalised."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w_down = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    if routing == "balanced":
        ids = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)[:, :top_k]
    elif routing == "zero_token_experts":  # only experts 1 and E-1 get tokens
        ids = torch.tensor([1, num_experts - 1])[torch.randint(0, 2, (num_tokens, top_k), generator=gen)]
    elif routing == "one_expert":  # every slot of every token to one expert (duplicates included)
        ids = torch.full((num_tokens, top_k), num_experts // 2)
    else:
        raise ValueError(routing)
    weights = torch.randn(num_tokens, top_k, generator=gen).softmax(-1)
    return tuple(t.to(DEVICE) if t is ids else t.to(DEVICE, dtype if t is not weights else torch.float32) for t in (x, weights, ids, w_gate_up, w_down))  # fmt: skip


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """``max |got - want| <= rel * max(|want|, 1e-3)`` (float64 comparison)."""
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1e-3)
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} * {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("num_tokens", "hidden", "inter", "num_experts", "top_k"),
    [(1, 32, 16, 4, 2), (7, 40, 24, 5, 2), (33, 32, 16, 8, 2), (20, 32, 16, 6, 1)],
)
def test_forward_matches_float64_reference(
    num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, dtype: torch.dtype
) -> None:
    x, w, ids, wgu, wd = make_inputs(num_tokens, hidden, inter, num_experts, top_k, dtype, seed=num_tokens)
    y = triton_moe_experts(x, w, ids, wgu, wd)
    assert y.shape == (num_tokens, hidden) and y.dtype == dtype
    assert_close_rel(y, reference(x, w, ids, wgu, wd), REL_TOL[dtype])


@pytest.mark.parametrize("routing", ["zero_token_experts", "one_expert"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_skewed_routing(routing: str, dtype: torch.dtype) -> None:
    x, w, ids, wgu, wd = make_inputs(19, 32, 16, 8, 2, dtype, routing=routing, seed=7)
    assert_close_rel(triton_moe_experts(x, w, ids, wgu, wd), reference(x, w, ids, wgu, wd), REL_TOL[dtype])


def test_forward_no_tokens() -> None:
    x, w, ids, wgu, wd = make_inputs(0, 32, 16, 4, 2, torch.float32)
    assert triton_moe_experts(x, w, ids, wgu, wd).shape == (0, 32)


def test_forward_strided_inputs_and_half_weights() -> None:
    """Non-contiguous ``x`` (a column slice), hub-layout weights seen transposed, bf16 routing weights."""
    x, w, ids, wgu, wd = make_inputs(9, 32, 16, 4, 2, torch.float32, seed=2)
    x_wide = torch.cat([x, torch.randn_like(x)], dim=1)[:, :32]
    wgu_t = wgu.transpose(1, 2).contiguous().transpose(1, 2)  # [E, 2I, H] view of a [E, H, 2I] tensor
    wd_t = wd.transpose(1, 2).contiguous().transpose(1, 2)
    y = triton_moe_experts(x_wide, w.bfloat16(), ids, wgu_t, wd_t)
    assert_close_rel(y, reference(x, w.bfloat16(), ids, wgu, wd), 1e-5)


def test_forward_custom_config_block_m_32() -> None:
    x, w, ids, wgu, wd = make_inputs(21, 32, 16, 4, 2, torch.float32, seed=4)
    config = KernelConfig(block_m=32, block_n=16, block_k=16)
    assert_close_rel(triton_moe_experts(x, w, ids, wgu, wd, config=config), reference(x, w, ids, wgu, wd), 1e-5)


def test_forward_is_bitwise_deterministic() -> None:
    x, w, ids, wgu, wd = make_inputs(33, 32, 16, 4, 2, torch.bfloat16, seed=9)
    assert torch.equal(triton_moe_experts(x, w, ids, wgu, wd), triton_moe_experts(x, w, ids, wgu, wd))


def test_pick_config_follows_rows_per_expert() -> None:
    assert pick_config(8, 128, interpret=False, train=False).decode  # 1-token inference: the two-launch path
    assert not pick_config(8, 128, interpret=False, train=True).decode  # gradients need the sorted path
    assert pick_config(8, 128, interpret=False, train=True).block_m == 16
    assert pick_config(512 * 8, 128, interpret=False).block_m == 32
    assert pick_config(1536 * 8, 128, interpret=False).block_m == 64
    assert pick_config(16384 * 8, 128, interpret=False).block_m == 128  # prefill / training: large tiles
    assert pick_config(10, 4, interpret=True).block_m == 16
    with pytest.raises(ValueError, match=r"block_m must be a power of two >= 16.*got 8"):
        KernelConfig(block_m=8, block_n=32, block_k=32)


def _bad(case: str) -> tuple[torch.Tensor, ...]:
    x, w, ids, wgu, wd = make_inputs(3, 32, 16, 4, 2, torch.float32)
    if case == "x_1d":
        x = x[0]
    elif case == "hidden":
        x = x[:, :24]
    elif case == "down_hidden":
        wd = wd[:, :24]
    elif case == "experts":
        wd = wd[:3]
    elif case == "inter":
        wgu = wgu[:, :30]
    elif case == "dtype":
        wd = wd.half()
    elif case == "x_dtype":
        x, wgu, wd = x.double(), wgu.double(), wd.double()
    elif case == "ids_shape":
        ids = ids[:, :1]
    elif case == "tokens":
        w, ids = w[:2], ids[:2]
    elif case == "ids_range":
        ids = ids.clone()
        ids[1, 1] = 4
    elif case == "ids_float":
        ids = ids.float()
    elif case == "weights_int":
        w = ids.clone()
    return x, w, ids, wgu, wd


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("x_1d", r"x must be 2-D \[T, H\], got 1-D"),
        ("hidden", "w_gate_up hidden dim .* is 32 but x has hidden size 24"),
        ("down_hidden", "w_down hidden dim .* is 24 but x has hidden size 32"),
        ("experts", "w_gate_up has 4 experts but w_down has 3"),
        ("inter", r"2 \* I = 32 .* got 30"),
        ("dtype", "share one dtype, got torch.float32, torch.float32 and torch.float16"),
        ("x_dtype", "float32, float16 or bfloat16, got torch.float64"),
        ("ids_shape", r"both be \[T, k\], got \(3, 2\) and \(3, 1\)"),
        ("tokens", "topk_ids has 2 tokens but x has 3"),
        ("ids_range", r"expert id 4, outside \[0, 4\)"),
        ("ids_float", "integer tensor, got dtype torch.float32"),
        ("weights_int", "topk_weights must be a floating tensor, got dtype torch.int64"),
    ],
)
def test_bad_input_raises_value_error(case: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        triton_moe_experts(*_bad(case))


def test_matches_transformers_qwen3_vl_moe_experts() -> None:
    """Forward and gradients equal transformers' ``Qwen3VLMoeTextExperts`` (eager) on the same weights, float32."""
    pytest.importorskip("transformers")
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    config = Qwen3VLMoeTextConfig(hidden_size=32, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=2)
    config._experts_implementation = "eager"
    experts = Qwen3VLMoeTextExperts(config).to(DEVICE)
    x, w, ids, wgu, wd = make_inputs(11, 32, 16, 6, 2, torch.float32, seed=12)
    with torch.no_grad():
        experts.gate_up_proj.copy_(wgu)
        experts.down_proj.copy_(wd)
    grad_y = torch.randn(11, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    results = []
    for fn in (lambda a, b: experts(a, ids, b), lambda a, b: triton_moe_experts(a, b, ids, *experts.parameters())):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xg, wg)
        results.append([y, *torch.autograd.grad(y, [xg, wg, *experts.parameters()], grad_y)])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_forward_under_no_grad_with_trainable_weights() -> None:
    """Inference with ``nn.Parameter`` weights: no graph is recorded and the result is unchanged."""
    x, w, ids, wgu, wd = make_inputs(9, 32, 16, 4, 2, torch.float32, seed=13)
    wgu, wd = wgu.requires_grad_(), wd.requires_grad_()
    with torch.no_grad():
        y = triton_moe_experts(x, w, ids, wgu, wd)
    assert not y.requires_grad
    assert_close_rel(y, reference(x, w, ids, wgu.detach(), wd.detach()), REL_TOL[torch.float32])
