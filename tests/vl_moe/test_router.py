"""Router: parity with transformers' Qwen3-VL-MoE router, renormalisation, deterministic ties, errors."""

from __future__ import annotations

import pytest
import torch

from vl_moe import TopKRouter, route, router_probs


def _reference_route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 brute force: order experts by (-probability, id) token by token."""
    probs = torch.softmax(logits.double(), dim=-1)
    ids = torch.tensor([sorted(range(len(row)), key=lambda e: (-row[e], e))[:top_k] for row in probs.tolist()])
    weights = probs.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(1, 4, 1), (13, 8, 2), (37, 16, 4), (9, 5, 5)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_matches_float64_reference(tokens: int, experts: int, top_k: int, renormalize: bool) -> None:
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens))
    weights, ids = route(logits, top_k, renormalize=renormalize)
    want_w, want_ids = _reference_route(logits, top_k, renormalize)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights.double(), want_w, rtol=1e-6, atol=1e-7)


def test_renormalised_weights_are_softmax_over_chosen_logits() -> None:
    logits = torch.randn(11, 8, generator=torch.Generator().manual_seed(1))
    weights, ids = route(logits, 3)
    torch.testing.assert_close(weights, torch.softmax(logits.gather(-1, ids), dim=-1))
    raw, _ = route(logits, 3, renormalize=False)
    assert bool((raw.sum(-1) < 1).all())
    torch.testing.assert_close(raw, router_probs(logits).gather(-1, ids))


def test_exact_ties_pick_the_lower_expert_id() -> None:
    logits = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],  # all equal: the first k ids
            [0.0, 2.0, 1.0, 2.0],  # tie for the top: 1 before 3
            [3.0, 1.0, 1.0, 1.0],  # tie at the boundary: 1 wins over 2 and 3
            [-1.0, 5.0, 5.0, 5.0],
        ]
    )
    _, ids = route(logits, 2)
    assert ids.tolist() == [[0, 1], [1, 3], [0, 1], [1, 2]]
    many = torch.randint(0, 3, (200, 8), generator=torch.Generator().manual_seed(2)).float()  # many ties
    for top_k in (1, 3, 8):
        assert torch.equal(route(many, top_k)[1], _reference_route(many, top_k, True)[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_router(dtype: torch.dtype) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextTopKRouter

    config = transformers.Qwen3VLMoeTextConfig(hidden_size=24, num_experts=10, num_experts_per_tok=3)
    theirs = Qwen3VLMoeTextTopKRouter(config).to(dtype)
    ours = TopKRouter(24, 10, 3).to(dtype)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(3)).to(dtype)
    want_logits, want_w, want_ids = theirs(x)
    logits, weights, ids = ours(x)
    assert weights.dtype == want_w.dtype == dtype
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=0)
    # bfloat16 logits tie often; torch.topk may order equal values either way, ours puts the lower id
    # first. Compare the chosen sets (and their weights) in id order.
    ids_sorted, order = ids.sort(-1)
    want_sorted, want_order = want_ids.sort(-1)
    assert torch.equal(ids_sorted, want_sorted)
    torch.testing.assert_close(weights.gather(-1, order), want_w.gather(-1, want_order), rtol=0, atol=0)


def test_weights_carry_gradient_to_logits() -> None:
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    ids = route(logits.detach(), 2)[1]

    def f(lg: torch.Tensor) -> torch.Tensor:
        return torch.softmax(lg, -1).gather(-1, ids) / torch.softmax(lg, -1).gather(-1, ids).sum(-1, keepdim=True)

    upstream = torch.randn(5, 2, dtype=torch.float64)
    (route(logits, 2)[0] * upstream).sum().backward()
    want = torch.autograd.grad((f(logits) * upstream).sum(), logits)[0]
    torch.testing.assert_close(logits.grad, want)


def test_bad_inputs_raise() -> None:
    logits = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"top_k \(7\) must be <= num_experts \(6\)"):
        route(logits, 7)
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        route(logits, 0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = logits.clone()
        broken[2, 3] = bad
        with pytest.raises(ValueError, match="1 non-finite values"):
            route(broken, 2)
    with pytest.raises(ValueError, match="floating-point"):
        route(torch.ones(3, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"top_k \(5\) must be <= num_experts \(4\)"):
        TopKRouter(8, 4, 5)
    with pytest.raises(ValueError, match="hidden size 7 but the router expects 8"):
        TopKRouter(8, 4, 2)(torch.randn(3, 7))
