"""On- and off-policy distillation against float64 hand computations on tiny random VLMs."""

from __future__ import annotations

import pytest
import torch
from _cli_helpers import EOS, prompt_batch, tiny_vlm

from vl_train.distill import (
    completion_mask,
    off_policy_distill_loss,
    on_policy_distill_step,
    sampled_distill_loss,
)


@pytest.fixture(scope="module")
def models():
    student, teacher = tiny_vlm(0), tiny_vlm(1)
    return student, teacher


def _fixed_sequences(batch: dict[str, torch.Tensor], steps: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    completion = torch.randint(3, 80, (2, steps), generator=g)
    completion[1, 2] = EOS  # row 1 stops after 3 tokens
    mask = completion_mask(completion, [EOS])
    return torch.cat([batch["input_ids"], completion], 1), mask


def _full_logprobs(model, batch, sequences, mask, temperature):
    """``[B, T, V]`` float64 log-probabilities at the completion positions from a plain full forward."""
    steps = mask.shape[1]
    inputs = dict(batch, input_ids=sequences, attention_mask=torch.cat([batch["attention_mask"], mask.long()], 1))
    inputs["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(mask, dtype=torch.long)], 1)
    logits = model(**inputs).logits[:, -steps - 1 : -1].double() / temperature
    return torch.log_softmax(logits, -1)


def test_completion_mask() -> None:
    tokens = torch.tensor([[5, EOS, 7, EOS], [5, 6, 7, 8]])
    assert completion_mask(tokens, [EOS]).tolist() == [[True, True, False, False], [True] * 4]
    assert completion_mask(tokens, []).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_reverse_kl_matches_hand(models, temperature: float) -> None:
    student, teacher = models
    batch = prompt_batch()
    sequences, mask = _fixed_sequences(batch)
    out = sampled_distill_loss(student, teacher, batch, sequences, mask, temperature=temperature, chunk_size=3)
    tokens = sequences[:, batch["input_ids"].shape[1] :]
    s = _full_logprobs(student, batch, sequences, mask, temperature).gather(-1, tokens[..., None])[..., 0]
    with torch.no_grad():
        t = _full_logprobs(teacher, batch, sequences, mask, temperature).gather(-1, tokens[..., None])[..., 0]
    k = (s - t)[mask]
    assert float(out.loss.detach()) == pytest.approx(float(k.detach().mean()), rel=1e-5, abs=1e-6)
    # the score-function gradient: mean of sg(k) * grad log p(y_t)
    student.zero_grad()
    out.loss.backward()
    got = [p.grad.clone() for p in student.parameters() if p.grad is not None]
    student.zero_grad()
    (k.detach() * s[mask]).mean().backward()
    want = [p.grad.clone() for p in student.parameters() if p.grad is not None]
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)
    student.zero_grad()


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_jsd_matches_hand(models, beta: float) -> None:
    student, teacher = models
    batch = prompt_batch(seed=1)
    sequences, mask = _fixed_sequences(batch)
    out = sampled_distill_loss(student, teacher, batch, sequences, mask, loss="jsd", beta=beta, chunk_size=4)
    with torch.no_grad():
        sp = _full_logprobs(student, batch, sequences, mask, 1.0)[mask]
        tq = _full_logprobs(teacher, batch, sequences, mask, 1.0)[mask]
    total = 0.0
    for s_row, t_row in zip(sp, tq):  # float64 loop over positions
        p, q = s_row.exp(), t_row.exp()
        if beta == 0.0:
            value = (q * (t_row - s_row)).sum()
        elif beta == 1.0:
            value = (p * (s_row - t_row)).sum()
        else:
            m = beta * q + (1 - beta) * p
            value = beta * (q * (t_row - m.log())).sum() + (1 - beta) * (p * (s_row - m.log())).sum()
        total += float(value)
    assert out.loss.item() == pytest.approx(total / len(sp), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_step_trains_student_only(models, loss: str) -> None:
    student, teacher = models
    before = [p.detach().clone() for p in teacher.parameters()]
    torch.manual_seed(0)
    out = on_policy_distill_step(student, teacher, prompt_batch(), loss=loss, max_new_tokens=4, temperature=1.0)
    assert (
        torch.isfinite(out.loss)
        and out.sequences.shape[1] == prompt_batch()["input_ids"].shape[1] + out.completion_mask.shape[1]
    )
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.model.language_model.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    student.zero_grad()


def test_bad_inputs(models) -> None:
    student, teacher = models
    batch = prompt_batch()
    sequences, mask = _fixed_sequences(batch)
    with pytest.raises(ValueError, match="reverse_kl"):
        sampled_distill_loss(student, teacher, batch, sequences, mask, loss="forward_kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"mask \(2, 4\)"):
        sampled_distill_loss(student, teacher, batch, sequences, mask[:, :4])
    with pytest.raises(ValueError, match="max_new_tokens"):
        on_policy_distill_step(student, teacher, batch, max_new_tokens=0)


def _labelled_batch() -> dict[str, torch.Tensor]:
    batch = prompt_batch(seed=2)
    labels = batch["input_ids"].clone()
    labels[:, :9] = -100
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return batch


def test_off_policy_ce_and_forward_kl(models) -> None:
    student, teacher = models
    batch = _labelled_batch()
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = student(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].double()
    ce = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    got = off_policy_distill_loss(student, batch, reduction="token")
    assert got.loss.item() == pytest.approx(ce.detach().item(), rel=1e-5)
    with torch.no_grad():
        t_all = torch.log_softmax(teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits.double(), -1)
    s_lp = torch.log_softmax(logits, -1)[keep]
    t_lp = t_all[:, :-1][keep]
    per = (t_lp.exp() * (t_lp - s_lp)).sum(-1)
    full = off_policy_distill_loss(student, batch, t_all.float(), reduction="token")
    flat = off_policy_distill_loss(student, batch, t_lp.float(), reduction="token", ce_weight=0.5)
    assert full.loss.item() == pytest.approx(per.detach().mean().item(), rel=1e-5)
    assert flat.loss.item() == pytest.approx((per.detach().mean() + 0.5 * ce.detach()).item(), rel=1e-5)
    # sqrt reduction: each row is one sample
    n = keep.sum(1).double()
    sums = torch.stack([per[: int(n[0])].sum(), per[int(n[0]) :].sum()])
    want = (sums / n.sqrt()).sum() / n.sqrt().sum()
    sq = off_policy_distill_loss(student, batch, t_all.float(), reduction="sqrt")
    assert sq.loss.item() == pytest.approx(want.detach().item(), rel=1e-5)
    sq.loss.backward()
    assert any(p.grad is not None for p in student.parameters())
    student.zero_grad()
    with pytest.raises(ValueError, match="teacher_logprobs"):
        off_policy_distill_loss(student, batch, t_lp[:-1].float())
