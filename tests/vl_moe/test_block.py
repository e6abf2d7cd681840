"""SparseMoeBlock: state-dict interop and output/gradient parity with transformers' Qwen3-VL-MoE block."""

from __future__ import annotations

import re

import pytest
import torch

from vl_moe import MoEOutput, SparseMoeBlock, moe_experts_reference, route

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock  # noqa: E402


def _pair(
    hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype, impl: str = "eager", seed: int = 0
) -> tuple[SparseMoeBlock, torch.nn.Module]:
    torch.manual_seed(seed)
    ours = SparseMoeBlock(hidden, inter, experts, top_k, backend="torch", init_std=0.3).to(dtype)
    config = transformers.Qwen3VLMoeTextConfig(
        hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k
    )
    config._experts_implementation = impl
    theirs = Qwen3VLMoeTextSparseMoeBlock(config).to(dtype)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _run(block: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> list[torch.Tensor]:
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = block(x)
    out.backward(upstream)
    params = dict(block.named_parameters())
    grads = [params[k].grad for k in ("gate.weight", "experts.gate_up_proj", "experts.down_proj")]
    return [out.detach(), x.grad, *grads]  # type: ignore[list-item]


NAMES = ["out", "d_x", "d_gate", "d_gate_up", "d_down"]


@pytest.mark.parametrize(
    ("batch", "length", "hidden", "inter", "experts", "top_k"),
    [(1, 1, 8, 4, 4, 1), (2, 7, 12, 5, 6, 2), (3, 5, 16, 8, 8, 3), (2, 9, 10, 6, 5, 5)],
)
def test_float64_matches_transformers(
    batch: int, length: int, hidden: int, inter: int, experts: int, top_k: int
) -> None:
    ours, theirs = _pair(hidden, inter, experts, top_k, torch.float64)
    x = torch.randn(batch, length, hidden, dtype=torch.float64)
    upstream = torch.randn_like(x)
    for name, a, b in zip(NAMES, _run(ours, x, upstream), _run(theirs, x, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize(("tokens", "top_k"), [(37, 2), (64, 4)])
def test_float32_matches_transformers(impl: str, tokens: int, top_k: int) -> None:
    ours, theirs = _pair(32, 16, 8, top_k, torch.float32, impl=impl, seed=1)
    exact, _ = _pair(32, 16, 8, top_k, torch.float64, seed=1)
    x = torch.randn(1, tokens, 32)
    upstream = torch.randn_like(x)
    got, want = _run(ours, x, upstream), _run(theirs, x, upstream)
    truth = _run(exact, x.double(), upstream.double())
    for name, a, b, t in zip(NAMES, got, want, truth):
        scale = float(t.abs().max())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6 * scale, msg=name)
        ours_err, theirs_err = (a.double() - t).abs().max(), (b.double() - t).abs().max()
        assert ours_err <= 3 * theirs_err + 1e-7 * scale, (name, float(ours_err), float(theirs_err))


def test_bfloat16_close_to_float64_and_to_transformers() -> None:
    ours, theirs = _pair(32, 16, 8, 2, torch.bfloat16, seed=2)
    exact, _ = _pair(32, 16, 8, 2, torch.float64, seed=2)
    x = torch.randn(2, 20, 32)
    got = ours(x.bfloat16()).double()
    # float64 ground truth with the routing the bfloat16 router chose (ids must match to compare at all)
    _, weights, ids = ours.gate(x.bfloat16().reshape(-1, 32))
    flat = x.double().reshape(-1, 32)
    truth = moe_experts_reference(
        flat, weights.double(), ids, exact.experts.gate_up_proj.detach(), exact.experts.down_proj.detach()
    ).view_as(got)
    theirs_err = (theirs(x.bfloat16()).double() - truth).abs().max()
    ours_err = (got - truth).abs().max()
    assert ours_err <= 2 * theirs_err + 1e-3, (float(ours_err), float(theirs_err))


def test_state_dict_round_trip_and_router_outputs() -> None:
    ours, theirs = _pair(16, 8, 4, 2, torch.float32)
    assert (
        sorted(ours.state_dict())
        == sorted(theirs.state_dict())
        == [
            "experts.down_proj",
            "experts.gate_up_proj",
            "gate.weight",
        ]
    )
    assert ours.experts.gate_up_proj.shape == (4, 16, 16) and ours.experts.down_proj.shape == (4, 16, 8)
    fresh = SparseMoeBlock(16, 8, 4, 2)
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(3, 4, 16)
    result = fresh.forward_with_router(x)
    assert isinstance(result, MoEOutput)
    logits, weights, ids = theirs.gate(x)
    torch.testing.assert_close(result.router_logits, logits)
    assert torch.equal(result.topk_ids, ids)
    torch.testing.assert_close(result.topk_weights, weights)
    torch.testing.assert_close(result.hidden_states, fresh(x))
    assert torch.equal(route(result.router_logits, 2)[1], result.topk_ids)


def test_backend_setting_and_bad_inputs() -> None:
    block = SparseMoeBlock(16, 8, 4, 2)
    assert block.backend == "auto"
    block.backend = "torch"
    assert block.experts.backend == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        block.backend = "cuda"
    with pytest.raises(ValueError, match="backend must be one of"):
        SparseMoeBlock(16, 8, 4, 2, backend="gpu")
    with pytest.raises(ValueError, match=r"top_k \(5\) must be <= num_experts \(4\)"):
        SparseMoeBlock(16, 8, 4, 5)
    with pytest.raises(ValueError, match="hidden size 12 but the block expects 16"):
        block(torch.randn(2, 12))
    with pytest.raises(
        ValueError, match=re.escape("dtype torch.bfloat16 but the block's weights have dtype torch.float32")
    ):
        block(torch.randn(2, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="non-finite"):
        block(torch.full((2, 16), float("nan")))
