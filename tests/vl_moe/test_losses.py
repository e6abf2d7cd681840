"""Load-balancing loss and router z-loss: exact values, transformers relation, masks, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch

from vl_moe import expert_counts, load_balancing_loss, route, router_z_loss


def _reference_lbl(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 loop: E * sum_e f_e P_e over unmasked tokens, f_e = assignments / tokens."""
    num_tokens, num_experts = logits.shape
    m = torch.ones(num_tokens, dtype=torch.float64) if mask is None else mask.reshape(-1).double()
    probs = torch.softmax(logits.double(), -1)
    f = torch.zeros(num_experts, dtype=torch.float64)
    for t in range(num_tokens):
        for e in ids[t].tolist():
            f[e] += m[t]
    f = f / m.sum()
    p = (probs * m[:, None]).sum(0) / m.sum()
    return num_experts * (f * p).sum()


def test_perfect_balance_gives_exactly_k() -> None:
    for experts, top_k in ((4, 1), (8, 2), (16, 4), (6, 6)):
        logits = torch.zeros(2 * experts, experts)
        ids = torch.stack([torch.roll(torch.arange(experts), t)[:top_k] for t in range(2 * experts)])
        loss = float(load_balancing_loss(logits, top_k, expert_ids=ids))
        if experts & (experts - 1) == 0:  # 1/E exact in binary: the loss is exactly k
            assert loss == top_k
        else:
            assert math.isclose(loss, top_k, rel_tol=1e-6)
        assert torch.equal(expert_counts(ids, experts)[0], torch.full((experts,), 2.0 * top_k))


def test_collapsed_router_gives_e_over_k_times_k() -> None:
    logits = torch.tensor([[30.0, 20.0, 0.0, 0.0]]).repeat(5, 1)  # always experts 0 and 1, P ~ (1, 0, 0, 0)
    loss = load_balancing_loss(logits, 2)
    assert math.isclose(float(loss), 4 * 1.0, rel_tol=1e-4)  # E * (f_0 P_0) = 4 * 1 * 1


@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(13, 5, 2), (32, 8, 4), (7, 3, 1)])
def test_matches_float64_reference_with_and_without_mask(tokens: int, experts: int, top_k: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    logits = torch.randn(tokens, experts, generator=g)
    ids = route(logits, top_k)[1]
    mask = (torch.rand(tokens, generator=g) > 0.3).long()
    torch.testing.assert_close(load_balancing_loss(logits, top_k).double(), _reference_lbl(logits, ids))
    got = load_balancing_loss(logits, top_k, attention_mask=mask)
    torch.testing.assert_close(got.double(), _reference_lbl(logits, ids, mask))


def test_equals_transformers_for_one_layer_and_relation_for_several() -> None:
    pytest.importorskip("transformers")
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    batch, length, experts, top_k = 3, 6, 8, 2
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[2, 4:] = 0  # right padding
    layers = [torch.randn(batch * length, experts, generator=g) for _ in range(3)]
    for m in (None, mask):
        theirs = load_balancing_loss_func((layers[0],), experts, top_k, m)
        torch.testing.assert_close(load_balancing_loss(layers[0], top_k, attention_mask=m), theirs)
        # several layers: transformers pools f and P over layers first; ours averages per-layer losses
        theirs_many = load_balancing_loss_func(tuple(layers), experts, top_k, m)
        ones = torch.ones(batch * length) if m is None else m.reshape(-1).float()
        f = torch.stack([expert_counts(route(lg, top_k)[1], experts, m)[0] / ones.sum() for lg in layers]).mean(0)
        p = torch.stack([(torch.softmax(lg, -1) * ones[:, None]).sum(0) / ones.sum() for lg in layers]).mean(0)
        torch.testing.assert_close(theirs_many, experts * (f * p).sum())
        ours_many = load_balancing_loss(layers, top_k, attention_mask=m)
        per_layer = torch.stack([load_balancing_loss(lg, top_k, attention_mask=m) for lg in layers])
        torch.testing.assert_close(ours_many, per_layer.mean())
        assert not torch.allclose(ours_many, theirs_many)


def test_gradient_flows_through_p_only() -> None:
    logits = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    ids = route(logits.detach(), 2)[1]
    load_balancing_loss(logits, 2, expert_ids=ids).backward()
    counts = expert_counts(ids, 4)[0].double()
    want = torch.autograd.grad(4 * (counts / 10 * torch.softmax(logits, -1).mean(0)).sum(), logits)[0]
    torch.testing.assert_close(logits.grad, want)


def test_padding_tokens_do_not_matter() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    base = load_balancing_loss(logits, 2, attention_mask=mask)
    changed = logits.clone()
    changed[0, 3:] = torch.randn(2, 6, generator=g) * 10
    torch.testing.assert_close(load_balancing_loss(changed, 2, attention_mask=mask), base)
    real = torch.cat([logits[0, :3], logits[1, :4]])
    torch.testing.assert_close(load_balancing_loss(real, 2), base)
    torch.testing.assert_close(router_z_loss(changed, mask), router_z_loss(real))


def test_router_z_loss_values() -> None:
    logits = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = (torch.logsumexp(logits, -1) ** 2).mean()
    # router_z_loss accumulates in float32 by design, so the float64 oracle gets float32 tolerances
    torch.testing.assert_close(router_z_loss(logits).double(), want, rtol=1e-6, atol=1e-6)
    assert math.isclose(float(router_z_loss(torch.zeros(3, 4))), math.log(4) ** 2, rel_tol=1e-6)
    big = torch.tensor([[1e3, 0.0]], dtype=torch.bfloat16)  # logsumexp in float32, no overflow
    assert math.isclose(float(router_z_loss(big)), 1e6, rel_tol=1e-3)
    torch.testing.assert_close(
        router_z_loss([logits, 2 * logits]), (router_z_loss(logits) + router_z_loss(2 * logits)) / 2
    )


def test_bad_inputs_raise() -> None:
    logits = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"top_k \(5\) must be <= num_experts \(4\)"):
        load_balancing_loss(logits, 5)
    broken = logits.clone()
    broken[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        load_balancing_loss(broken, 2)
    with pytest.raises(ValueError, match="non-finite"):
        router_z_loss(broken)
    with pytest.raises(ValueError, match=r"attention_mask has 5 entries \(shape \(5,\)\) but the router logits have 6"):
        load_balancing_loss(logits, 2, attention_mask=torch.ones(5))
    with pytest.raises(ValueError, match=r"expert_ids must be \[T, k\] = \(6, 2\).*got \(6, 3\)"):
        load_balancing_loss(logits, 2, expert_ids=torch.zeros(6, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_tokens is required"):
        load_balancing_loss(logits, 2, counts=torch.ones(4))
    with pytest.raises(ValueError, match=r"counts must be \[E\] = \(4,\).*got \(5,\)"):
        load_balancing_loss(logits, 2, counts=torch.ones(5), num_tokens=6)
    with pytest.raises(ValueError, match="expert_ids has 1 layers but router_logits has 2"):
        load_balancing_loss([logits, logits], 2, expert_ids=[route(logits, 2)[1]])
    with pytest.raises(ValueError, match="empty sequence"):
        router_z_loss([])
