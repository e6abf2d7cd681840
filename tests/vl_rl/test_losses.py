"""policy_loss: value and gradient of every method against the naive float64 reference."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from _reference_losses import ref_cispo_vectorised, ref_clip_fractions, ref_gspo_vectorised, ref_policy_loss

from vl_rl.losses import aggregate, kl_estimate, policy_loss

METHODS = ["grpo", "dr_grpo", "dapo", "gspo", "gspo_token", "sapo", "cispo"]
B, T = 4, 17  # odd T


def _inputs(
    *, noise: float = 0.3, per_token: bool = False, seed: int = 0, empty_row: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (logprobs, old, advantages, mask, ref) with NaN/inf garbage at masked positions."""
    gen = torch.Generator().manual_seed(seed)
    lp = -3.0 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    old = lp + noise * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = lp + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0] = True  # full row
    mask[1, 3 : T - 4] = True  # left and right padding
    mask[2, :5] = True  # short row
    mask[3, 1:] = not empty_row
    shape = (B, T) if per_token else (B,)
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    lp[~mask] = float("nan")
    old[~mask] = float("inf")
    ref[~mask] = float("nan")
    if per_token:
        adv[~mask] = float("nan")
    return lp, old, adv, mask, ref


def _ours(lp: torch.Tensor, *args: torch.Tensor, **kw: object) -> tuple[torch.Tensor, torch.Tensor, dict]:
    leaf = lp.detach().clone().requires_grad_(True)
    loss, metrics = policy_loss(leaf, *args, **kw)  # type: ignore[arg-type]
    loss.backward()
    assert leaf.grad is not None
    return loss.detach(), leaf.grad, metrics


def _ref(lp: torch.Tensor, *args: torch.Tensor, method: str, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = lp.detach().double().clone().requires_grad_(True)
    loss = ref_policy_loss(leaf, *args, method, **kw)  # type: ignore[arg-type,call-arg]
    loss.backward()
    assert leaf.grad is not None
    return loss.detach(), leaf.grad


def _cases() -> list[tuple[str, bool, float]]:
    out = []
    for method in METHODS:
        for per_token in (False, True):
            if method == "gspo" and per_token:
                continue
            for noise in (0.3, 2e-4):
                out.append((method, per_token, noise))
    return out


@pytest.mark.parametrize(("method", "per_token", "noise"), _cases())
def test_value_and_grad_match_reference_float64(method: str, per_token: bool, noise: float) -> None:
    lp, old, adv, mask, _ = _inputs(noise=noise, per_token=per_token, seed=len(method))
    loss, grad, metrics = _ours(lp, old, adv, mask, method=method)
    want_loss, want_grad = _ref(lp, old, adv, mask, method=method)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(method: str, dtype: torch.dtype) -> None:
    lp, old, adv, mask, _ = _inputs(per_token=method != "gspo", seed=3)
    lp, old = lp.to(dtype), old.to(dtype)
    loss, grad, _ = _ours(lp, old, adv.float(), mask, method=method)
    assert loss.dtype == torch.float32  # computed in float32, never in dtype
    assert grad.dtype == dtype
    want_loss, want_grad = _ref(lp, old.double(), adv, mask, method=method)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol * want_grad.abs().max().item())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean", "const"])
def test_aggregation_override(method: str, aggregation: str) -> None:
    lp, old, adv, mask, _ = _inputs(per_token=False, seed=11, empty_row=True)
    kw = {"aggregation": aggregation, "max_tokens": 40 if aggregation == "const" else None}
    loss, grad, _ = _ours(lp, old, adv, mask, method=method, **kw)
    want_loss, want_grad = _ref(lp, old, adv, mask, method=method, **kw)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)


def test_aggregations_by_hand() -> None:
    per_tok = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("nan"), float("nan")], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert aggregate(per_tok, mask, "token_mean").item() == pytest.approx(7 / 3)
    assert aggregate(per_tok, mask, "seq_mean").item() == pytest.approx((1.5 + 4) / 2)  # empty row left out
    assert aggregate(per_tok, mask, "const", max_tokens=10).item() == pytest.approx(7 / 30)
    assert aggregate(per_tok, mask, "const").item() == pytest.approx(7 / 9)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("method", ["grpo", "dapo", "sapo", "cispo", "gspo_token"])
def test_kl_penalty_matches_reference(estimator: str, method: str) -> None:
    lp, old, adv, mask, ref = _inputs(seed=5)
    kw = {"ref_logprobs": ref, "kl_coef": 0.05, "kl_estimator": estimator}
    loss, grad, metrics = _ours(lp, old, adv, mask, method=method, **kw)
    want_loss, want_grad = _ref(lp, old, adv, mask, method=method, **kw)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)
    # the metric: token mean of the estimator, written out from its formula
    x = (ref - lp)[mask]
    formula = {"k1": -x, "k2": x**2 / 2, "k3": torch.exp(x) - x - 1}[estimator]
    assert metrics["kl"].item() == pytest.approx(formula.mean().item(), rel=1e-6)
    torch.testing.assert_close(kl_estimate(lp[mask], ref[mask], estimator), formula)  # type: ignore[arg-type]


def test_kl_metric_without_penalty_leaves_loss_unchanged() -> None:
    lp, old, adv, mask, ref = _inputs(seed=6)
    plain, grad, metrics = _ours(lp, old, adv, mask)
    with_ref, grad_ref, metrics_ref = _ours(lp, old, adv, mask, ref_logprobs=ref)
    assert "kl" not in metrics and "kl" in metrics_ref
    assert torch.equal(plain, with_ref) and torch.equal(grad, grad_ref)


def test_gspo_and_gspo_token_agree_for_sequence_advantages() -> None:
    for noise, clip in ((2e-4, None), (0.3, 0.2), (0.05, 0.02)):
        lp, old, adv, mask, _ = _inputs(noise=noise, seed=21, empty_row=True)
        for aggregation in ("seq_mean", "token_mean", "const"):
            kw = {"clip_low": clip, "clip_high": clip, "aggregation": aggregation}
            a, ga, _ = _ours(lp, old, adv, mask, method="gspo", **kw)
            b, gb, _ = _ours(lp, old, adv, mask, method="gspo_token", **kw)
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-14)
            assert ga.abs().sum() > 0


def test_sapo_gradient_weight_is_one_at_ratio_one() -> None:
    for a in (0.7, -0.7):
        lp = torch.tensor([[-1.3]], dtype=torch.float64)
        adv = torch.tensor([a], dtype=torch.float64)
        _, grad, _ = _ours(lp, lp.clone(), adv, torch.ones(1, 1, dtype=torch.bool), method="sapo")
        assert grad.item() == -a  # -A * sech^2(0) * r, r = 1: exactly


def test_sapo_gradient_weight_is_sech_squared() -> None:
    lp, old, adv, mask, _ = _inputs(per_token=True, seed=8)
    _, grad, _ = _ours(lp, old, adv, mask, method="sapo", aggregation="token_mean", tau_pos=1.0, tau_neg=1.05)
    r = torch.exp(lp - old)[mask]
    a = adv[mask]
    tau = torch.where(a > 0, 1.0, 1.05)
    weight = grad[mask] * mask.sum() / (-a * r)
    torch.testing.assert_close(weight, 1.0 / torch.cosh(tau * (r - 1) / 2) ** 2)


def test_clip_fractions_by_construction() -> None:
    r = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.0, 1.1, 3.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)  # the masked 3.0 must not count
    lp = torch.zeros(1, 7, dtype=torch.float64)
    _, grad, m = _ours(lp, -torch.log(r), adv, mask, method="grpo")
    assert m["clip_frac_low"].item() == pytest.approx(1 / 6)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 6)
    assert grad[0, 0] == 0 and grad[0, 2] == 0 and grad[0, 1] != 0 and grad[0, 3] != 0
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 1.5 + 0.5 + 0.5 + 1.0 + 1.1) / 6)
    _, _, m = _ours(lp, -torch.log(r), adv, mask, method="cispo")  # weight cap only: r > 1.28
    assert m["clip_frac_low"].item() == 0 and m["clip_frac_high"].item() == pytest.approx(2 / 6)
    _, _, m = _ours(lp, -torch.log(r), adv, mask, method="cispo", clip_low=0.2)
    assert m["clip_frac_low"].item() == pytest.approx(2 / 6)


@pytest.mark.parametrize("method", ["grpo", "dapo"])
def test_clip_fractions_match_reference(method: str) -> None:
    lp, old, adv, mask, _ = _inputs(per_token=True, seed=13)
    _, _, m = _ours(lp, old, adv, mask, method=method)
    lo, hi = (0.2, 0.2) if method == "grpo" else (0.2, 0.28)
    low, high = ref_clip_fractions(lp, old, adv, mask, lo, hi)
    assert low > 0 and high > 0
    assert m["clip_frac_low"].item() == pytest.approx(low) and m["clip_frac_high"].item() == pytest.approx(high)


def test_gspo_clip_fractions_are_per_sequence() -> None:
    lp = torch.zeros(4, 3, dtype=torch.float64)
    s = torch.tensor([1.01, 0.99, 1.01, 1.0], dtype=torch.float64)
    old = -torch.log(s)[:, None].expand(4, 3).clone()
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    mask = torch.ones(4, 3, dtype=torch.bool)
    _, _, m = _ours(lp, old, adv, mask, method="gspo")
    assert m["clip_frac_high"].item() == pytest.approx(1 / 4)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 4)
    assert m["ratio_mean"].item() == pytest.approx(s.mean().item())


@pytest.mark.parametrize("method", METHODS)
def test_all_masked(method: str) -> None:
    lp, old, adv, mask, ref = _inputs(seed=2)
    none = torch.zeros_like(mask)
    loss, grad, m = _ours(lp, old, adv, none, method=method, ref_logprobs=ref, kl_coef=0.1, entropy=lp)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    assert all(v.item() == 0.0 for v in m.values())


def test_entropy_metric_and_detached_metrics() -> None:
    lp, old, adv, mask, _ = _inputs(seed=4)
    ent = torch.rand(B, T, dtype=torch.float64, requires_grad=True)
    _, _, m = _ours(lp, old, adv, mask, entropy=ent)
    assert m["entropy"].item() == pytest.approx(ent[mask].mean().item())
    assert all(not v.requires_grad and v.dtype == torch.float32 for v in m.values())
    assert set(m) == {"clip_frac_low", "clip_frac_high", "ratio_mean", "entropy"}


def test_float_mask_and_no_grad_input() -> None:
    lp, old, adv, mask, _ = _inputs(seed=9)
    a, _ = policy_loss(lp, old, adv, mask)
    b, _ = policy_loss(lp, old, adv, mask.double())
    assert torch.equal(a, b) and not a.requires_grad


def test_dr_grpo_const_uses_max_tokens() -> None:
    lp, old, adv, mask, _ = _inputs(seed=10)
    default, _ = policy_loss(lp, old, adv, mask, method="dr_grpo")
    c64, _ = policy_loss(lp, old, adv, mask, method="dr_grpo", max_tokens=64)
    assert c64.item() == pytest.approx(default.item() * T / 64)


def test_nan_in_unmasked_logprobs_names_the_count() -> None:
    lp, old, adv, mask, ref = _inputs(seed=1)
    bad = lp.clone()
    bad[0, 0] = bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="logprobs has 2 NaN/inf"):
        policy_loss(bad, old, adv, mask)
    bad_old = old.clone()
    bad_old[1, 5] = float("nan")
    with pytest.raises(ValueError, match="old_logprobs has 1 NaN/inf"):
        policy_loss(lp, bad_old, adv, mask)
    bad_adv = adv.clone()
    bad_adv[0] = float("nan")
    with pytest.raises(ValueError, match="advantages has 1 NaN/inf"):
        policy_loss(lp, old, bad_adv, mask)
    bad_ref = ref.clone()
    bad_ref[0, 1] = float("nan")
    with pytest.raises(ValueError, match="ref_logprobs has 1 NaN/inf"):
        policy_loss(lp, old, adv, mask, ref_logprobs=bad_ref)
    policy_loss(bad, old, adv, mask, check_finite=False)  # opt-out: no host sync, no error


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"old_logprobs": torch.zeros(B, T - 1)},
            rf"old_logprobs has shape \({B}, {T - 1}\) but logprobs has \({B}, {T}\)",
        ),
        ({"mask": torch.ones(B + 1, T)}, rf"mask has shape \({B + 1}, {T}\)"),
        ({"advantages": torch.zeros(B + 1)}, rf"advantages must be .* got \({B + 1},\)"),
        ({"advantages": torch.zeros(B, T + 1)}, rf"got \({B}, {T + 1}\)"),
        ({"ref_logprobs": torch.zeros(B, 2)}, r"ref_logprobs has shape"),
        ({"entropy": torch.zeros(T)}, r"entropy has shape"),
        ({"logprobs": torch.zeros(T)}, r"logprobs must be \[B, T\]"),
        ({"advantages": torch.zeros(B, T), "method": "gspo"}, "gspo_token"),
        ({"kl_coef": 0.1}, "needs ref_logprobs"),
        ({"method": "sapo", "clip_high": 0.2}, "soft gate"),
        ({"method": "ppo"}, "method must be"),
        ({"aggregation": "sum"}, "aggregation must be"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"clip_low": -0.1}, "clip_low must be >= 0"),
        ({"tau_neg": 0.0}, "tau_pos and tau_neg"),
        ({"method": "dr_grpo", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_input(change: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "logprobs": torch.zeros(B, T),
        "old_logprobs": torch.zeros(B, T),
        "advantages": torch.zeros(B),
        "mask": torch.ones(B, T, dtype=torch.bool),
    }
    args.update(change)
    with pytest.raises(ValueError, match=match):
        policy_loss(**args)  # type: ignore[arg-type]


def test_cispo_gradient_is_the_truncated_weight() -> None:
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    old = lp - torch.tensor([[math.log(2.0), math.log(0.5)]], dtype=torch.float64)  # r = 2, 0.5
    _, grad, _ = _ours(
        lp, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool), method="cispo"
    )
    torch.testing.assert_close(grad, torch.tensor([[-1.28 / 2, -0.5 / 2]], dtype=torch.float64))


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Runs a test with 1 and with 2 intra-op threads (the block ops are parallel regions with 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["gspo", "gspo_token"])
def test_gspo_long_rows_in_several_blocks(method: str, dtype: torch.dtype, threads: int) -> None:
    """T large enough that the per-sequence sums run in several cache-sized row blocks, the last one partial."""
    b, t = 7, 1 << 15
    gen = torch.Generator().manual_seed(17)
    lp = -3.0 * torch.rand(b, t, generator=gen, dtype=torch.float64)
    shift = 2e-3 * torch.randn(b, 1, generator=gen, dtype=torch.float64)  # some rows beyond the 1e-3 clip
    old = lp + shift + 1e-3 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) < 0.7
    mask[2] = False  # an empty row
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    lp[~mask], old[~mask] = float("nan"), float("-inf")
    lp_d, old_d = lp.to(dtype), old.to(dtype)
    loss, grad, metrics = _ours(lp_d, old_d, adv.float(), mask, method=method, clip_low=1e-3, clip_high=1e-3)
    leaf = lp_d.double().requires_grad_(True)
    want = ref_gspo_vectorised(leaf, old_d.double(), adv.float().double(), mask, 1e-3, 1e-3)
    want.backward()
    assert leaf.grad is not None
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-7)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.double(), leaf.grad, rtol=tol, atol=tol * leaf.grad.abs().max().item())
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert 0 < metrics["clip_frac_low"] + metrics["clip_frac_high"] < 1  # some rows clipped, not all


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("clip_low", [None, 0.1])
def test_cispo_long_rows_in_several_blocks(per_token: bool, clip_low: float | None, threads: int) -> None:
    """CISPO's per-token pass runs in cache-sized row blocks; T large enough for several, the last partial."""
    b, t = 7, 1 << 15
    gen = torch.Generator().manual_seed(19)
    lp = -3.0 * torch.rand(b, t, generator=gen, dtype=torch.float64)
    old = lp + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) < 0.7
    mask[4] = False  # an empty row, with a NaN advantage that must not matter
    adv = torch.randn((b, t) if per_token else (b,), generator=gen, dtype=torch.float64)
    adv[4] = float("nan")
    lp[~mask], old[~mask] = float("nan"), float("inf")
    if per_token:
        adv[~mask] = float("inf")
    loss, grad, metrics = _ours(lp.float(), old.float(), adv.float(), mask, method="cispo", clip_low=clip_low)
    leaf = lp.float().double().requires_grad_(True)
    want = ref_cispo_vectorised(leaf, old.float().double(), adv.float().double(), mask, clip_low, 0.28)
    want.backward()
    assert leaf.grad is not None
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), leaf.grad, rtol=1e-5, atol=1e-5 * leaf.grad.abs().max().item())
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    r = torch.exp(lp.float().double() - old.float().double())[mask]
    assert metrics["clip_frac_high"].item() == pytest.approx((r > 1.28).double().mean().item(), rel=1e-5)
    low = 0.0 if clip_low is None else (r < 1 - clip_low).double().mean().item()
    assert metrics["clip_frac_low"].item() == pytest.approx(low, rel=1e-5, abs=1e-9)
    assert metrics["ratio_mean"].item() == pytest.approx(r.mean().item(), rel=1e-5)
