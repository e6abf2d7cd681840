"""Distillation losses against float64 formulas on full distributions, with padding, packing and beta limits."""

from __future__ import annotations

import math

import pytest
import torch

from vl_train.distill_losses import exact_reverse_kl, forward_kl, generalized_jsd, reverse_kl_sampled
from vl_train.losses import global_loss_normalizer, loss_normalizer

V, D = 11, 4


def _kl(a_logp, b_logp):
    """Float64 KL(a || b) per position from log-probabilities, 0 log 0 = 0."""
    a = a_logp.exp()
    return torch.where(a > 0, a * (a_logp - b_logp), torch.zeros_like(a)).sum(-1)


def _ref_divergence(kind, student_logits, teacher, beta=0.5, temperature=1.0):
    s = torch.log_softmax(student_logits.double() / temperature, -1)
    t = torch.log_softmax(teacher.double() / temperature, -1)
    if kind == "fkl":
        return _kl(t, s)
    if kind == "rkl":
        return _kl(s, t)
    m = torch.log(beta * t.exp() + (1 - beta) * s.exp())
    return beta * _kl(t, m) + (1 - beta) * _kl(s, m)


def _reduce(per_pos, mask, seg, reduction):
    """Per-(row, segment) Python loop over the masked positions."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for r in range(mask.shape[0]):
        for c in range(mask.shape[1]):
            if mask[r, c]:
                groups.setdefault((r, int(seg[r, c]) if seg is not None else 0), []).append(per_pos[r, c])
    num, den = torch.zeros((), dtype=torch.float64), 0.0
    for losses in groups.values():
        n, total = len(losses), torch.stack(losses).sum()
        if reduction == "token":
            num, den = num + total, den + n
        elif reduction == "sample":
            num, den = num + total / n, den + 1
        else:
            num, den = num + total / math.sqrt(n), den + math.sqrt(n)
    return num / den


def _data(b=3, length=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, length, D, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = 2 * torch.randn(b, length, V, generator=gen, dtype=torch.float64)
    teacher[0, 0, :3] = -math.inf  # a teacher that rules tokens out (forward KL must stay finite)
    mask = torch.rand(b, length, generator=gen) > 0.3
    mask[-1] = False  # a padded row
    seg = torch.sort(torch.randint(0, 2, (b, length), generator=gen), dim=1).values
    return hidden, weight, bias, teacher, mask, seg


CASES = [("fkl", forward_kl, 0.0), ("jsd", generalized_jsd, 0.3), ("jsd", generalized_jsd, 0.5)]


def _call(fn, beta, *args, **kwargs):
    return fn(*args, beta, **kwargs) if fn is generalized_jsd else fn(*args, **kwargs)


@pytest.mark.parametrize(("kind", "fn", "beta"), CASES)
@pytest.mark.parametrize("reduction", ["token", "sample", "sqrt"])
def test_hidden_path_matches_float64(kind, fn, beta, reduction):
    hidden, weight, bias, teacher, mask, seg = _data()
    out = _call(
        fn, beta, hidden, teacher, lm_head_weight=weight, lm_head_bias=bias, mask=mask, segment_ids=seg,
        reduction=reduction, chunk_size=3,
    )  # fmt: skip
    ref = _reduce(_ref_divergence(kind, hidden @ weight.T + bias, teacher, beta), mask, seg, reduction)
    torch.testing.assert_close(out.loss, ref, rtol=1e-11, atol=1e-12)
    got = torch.autograd.grad(out.loss, (hidden, weight, bias))
    want = torch.autograd.grad(ref, (hidden, weight, bias))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("kind", "beta"), [("fkl", 0.0), ("rkl", 1.0), ("jsd", 0.7)])
def test_logits_path_with_temperature(kind, beta):
    hidden, weight, _, teacher, mask, _ = _data(seed=1)
    teacher[0, 0, :3] = 0.0  # reverse KL is infinite against a teacher with zeros
    logits = (hidden @ weight.T).detach().requires_grad_(True)
    fn = {"fkl": forward_kl, "rkl": exact_reverse_kl, "jsd": generalized_jsd}[kind]
    out = _call(fn, beta, logits, teacher, mask=mask, temperature=1.7, chunk_size=4)
    ref = _reduce(_ref_divergence(kind, logits, teacher, beta, temperature=1.7), mask, None, "token")
    torch.testing.assert_close(out.loss, ref, rtol=1e-11, atol=1e-12)
    (g,), (r,) = torch.autograd.grad(out.loss, logits), torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    assert not g[~mask].any()


def test_float32_student_and_teacher_logits_equal_logprobs():
    hidden, weight, _, teacher, mask, _ = _data(seed=2)
    teacher[0, 0, :3] = 0.0
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float()
    a = exact_reverse_kl(h32, teacher.float(), lm_head_weight=w32, mask=mask)
    b = exact_reverse_kl(h32, torch.log_softmax(teacher.float(), -1), lm_head_weight=w32, mask=mask)
    assert a.loss.dtype == torch.float32
    torch.testing.assert_close(a.loss, b.loss)
    ref = _reduce(_ref_divergence("rkl", hidden @ weight.T, teacher), mask, None, "token")
    torch.testing.assert_close(a.loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_beta_limits():
    hidden, weight, _, teacher, mask, _ = _data(seed=3)
    teacher[0, 0, :3] = 0.0
    logits = hidden @ weight.T
    fkl = forward_kl(logits, teacher, mask=mask).loss
    rkl = exact_reverse_kl(logits, teacher, mask=mask).loss
    torch.testing.assert_close(generalized_jsd(logits, teacher, 0.0, mask=mask).loss, fkl)
    torch.testing.assert_close(generalized_jsd(logits, teacher, 1.0, mask=mask).loss, rkl)
    eps = 1e-7  # the scaled mixture tends to the two KLs at the ends
    torch.testing.assert_close(generalized_jsd(logits, teacher, eps, mask=mask).loss / eps, fkl, rtol=1e-5, atol=0)
    torch.testing.assert_close(generalized_jsd(logits, teacher, 1 - eps, mask=mask).loss / eps, rkl, rtol=1e-5, atol=0)
    sym = generalized_jsd(logits, teacher, 0.5, mask=mask).loss
    swapped = generalized_jsd(teacher, logits, 0.5, mask=mask).loss  # JSD_0.5 is symmetric
    torch.testing.assert_close(sym, swapped)


def test_reverse_kl_sampled_is_unbiased_in_value_and_gradient():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(V, dtype=torch.float64, generator=gen, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(V, dtype=torch.float64, generator=gen), -1)
    logp = torch.log_softmax(logits, -1)
    # Enumerate every sampled token y with its probability p(y): expectation of value and gradient.
    per_y = reverse_kl_sampled(logp, teacher, reduction="token")  # one position per token id
    weights = logp.exp().detach()
    exp_value = (weights * per_y.per_token).sum()
    exp_grad = torch.autograd.grad((weights * _per_token_losses(logp, teacher)).sum(), logits)[0]
    exact = exact_reverse_kl(logits[None], teacher[None])
    torch.testing.assert_close(exp_value, exact.loss.detach())
    torch.testing.assert_close(exp_grad, torch.autograd.grad(exact.loss, logits)[0])


def _per_token_losses(logp, teacher):
    """Each position alone: the sampled-token loss for every possible token id (graph kept)."""
    return torch.stack([reverse_kl_sampled(logp[i : i + 1], teacher[i : i + 1]).loss for i in range(V)])


def test_reverse_kl_sampled_masks_and_reduces():
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    mask = torch.rand(3, 5, generator=gen) > 0.4
    mask[0, 0] = True
    out = reverse_kl_sampled(s, t, mask=mask, reduction="sample")
    torch.testing.assert_close(out.loss, _reduce((s - t).detach(), mask, None, "sample"))
    (g,) = torch.autograd.grad(out.loss, s)
    assert not g[~mask].any()
    counts = mask.sum(1, keepdim=True).double()
    want = torch.where(mask, (s - t).detach() / counts, 0.0) / int((counts > 0).sum())
    torch.testing.assert_close(g, want)


def test_global_normalizer_over_micro_batches():
    hidden, weight, _, teacher, mask, seg = _data(b=4, seed=6)
    big = generalized_jsd(hidden, teacher, 0.4, lm_head_weight=weight, mask=mask, segment_ids=seg, reduction="sqrt")
    parts = [(0, 1), (1, 4)]
    z = global_loss_normalizer([loss_normalizer(mask[a:b], seg[a:b], "sqrt") for a, b in parts])
    total = sum(
        generalized_jsd(
            hidden[a:b], teacher[a:b], 0.4, lm_head_weight=weight, mask=mask[a:b], segment_ids=seg[a:b],
            reduction="sqrt", normalizer=z,
        ).loss
        for a, b in parts
    )  # fmt: skip
    torch.testing.assert_close(total, big.loss)
    for g, r in zip(torch.autograd.grad(total, (hidden, weight)), torch.autograd.grad(big.loss, (hidden, weight))):
        torch.testing.assert_close(g, r)


def test_bad_inputs():
    hidden, weight, _, teacher, mask, _ = _data()
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        generalized_jsd(hidden @ weight.T, teacher, 1.5)
    with pytest.raises(ValueError, match="teacher"):
        forward_kl(hidden @ weight.T, teacher[..., :-1])
    with pytest.raises(ValueError, match="share D"):
        forward_kl(hidden, teacher, lm_head_weight=weight[:, :-1])
    with pytest.raises(ValueError, match="mask shape"):
        forward_kl(hidden @ weight.T, teacher, mask=mask[:, :-1])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        forward_kl(hidden @ weight.T, teacher, temperature=0.0)
    with pytest.raises(ValueError, match="must match student_logprobs"):
        reverse_kl_sampled(torch.zeros(2, 3), torch.zeros(2, 4))


def test_hidden_path_peak_memory_is_bounded_by_the_chunk():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "_memory.py"
    spec = importlib.util.spec_from_file_location("_bench_memory", path)
    assert spec is not None and spec.loader is not None
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    n, d, v, chunk = 2048, 16, 2048, 32
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(n, d, generator=gen, requires_grad=True)
    w = torch.randn(v, d, generator=gen, requires_grad=True)
    teacher = torch.randn(n, v, generator=gen)  # an input: already in memory, never copied whole

    def run():
        generalized_jsd(h, teacher, 0.5, lm_head_weight=w, chunk_size=chunk).loss.backward()

    chunk_mb, full_mb = chunk * v * 4 / 2**20, n * v * 4 / 2**20
    params_mb = (h.numel() + w.numel()) * 4 / 2**20
    # The tool counts a view of an input as a new tensor: the teacher's storage (full_mb) once.
    peak = memory.peak_tensor_mb(run) - full_mb
    assert peak < 16 * chunk_mb + 2 * params_mb < full_mb / 2, peak
