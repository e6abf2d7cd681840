"""Tests for vl_rl.curriculum and vl_rl.sampling: filters, RLCS, dynamic sampling, mixed batches."""

from __future__ import annotations

import math
import random

import pytest
import torch

from vl_rl.curriculum import (
    MixedTaskBatcher,
    RLCSCurriculum,
    filter_dataset,
    pass_rate_filter,
    pass_rates_from_rewards,
)
from vl_rl.sampling import DynamicSampler, ExpansionRatio, filter_groups, select_balanced

# ---------------------------------------------------------------- pass-rate filter


def test_pass_rate_filter_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(37, 16, generator=g) < torch.rand(37, 1, generator=g)).float()
    rewards[0] = 1.0
    rewards[1] = 0.0
    keep = pass_rate_filter(rewards)
    for i in range(37):
        p = sum(1 for r in rewards[i].tolist() if r >= 0.5) / 16
        assert bool(keep[i]) == (0 < p <= 0.9)
    assert not keep[0] and not keep[1]
    assert torch.equal(pass_rate_filter(pass_rates_from_rewards(rewards)), keep)


def test_pass_rate_filter_edges() -> None:
    # k = 1: every pass rate is 0 or 1, so all are dropped
    assert not pass_rate_filter(torch.tensor([[1.0], [0.0], [1.0]])).any()
    # all-equal rows; keep all-wrong when asked
    rates = torch.tensor([0.0, 0.0, 0.9, 0.95])
    assert pass_rate_filter(rates).tolist() == [False, False, True, False]
    assert pass_rate_filter(rates, drop_all_wrong=False).tolist() == [True, True, True, False]
    assert pass_rate_filter(torch.empty(0)).numel() == 0


@pytest.mark.parametrize(
    ("scores", "kw", "match"),
    [
        (torch.tensor([0.5, 1.5]), {}, "pass rates must lie"),
        (torch.ones(2, 2, 2), {}, "shape"),
        (torch.tensor([[float("nan")]]), {}, "NaN"),
        (torch.tensor([0.5]), {"high": 1.2}, "high"),
    ],
)
def test_pass_rate_filter_bad_input(scores: torch.Tensor, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pass_rate_filter(scores, **kw)


def test_filter_dataset() -> None:
    table = {"a": [1, 1, 1, 1], "b": [0, 0, 0, 0], "c": [1, 0, 0, 1], "d": [1, 1, 1, 0]}
    res = filter_dataset(list(table), lambda q: table[q], high=0.7)
    assert res.kept == [2]
    assert res.pass_rates == [1.0, 0.0, 0.5, 0.75]
    assert res.stats == {
        "total": 4.0,
        "kept": 1.0,
        "too_easy": 2.0,
        "all_wrong": 1.0,
        "keep_fraction": 0.25,
    }
    with pytest.raises(ValueError, match="no rewards for query 1"):
        filter_dataset(["x", "y"], lambda q: [1.0] if q == "x" else [])


# ---------------------------------------------------------------- RLCS


def test_rlcs_ema_and_tiers() -> None:
    cur = RLCSCurriculum(4, init_pass_rates=[0.1, float("nan"), 0.5, 1.0], ema=0.9)
    assert cur.tier_of().tolist() == [0, -1, 1, 2]
    cur.update([0, 1], [1.0, 0.2])
    assert cur.pass_rates[0].item() == pytest.approx(0.9 * 0.1 + 0.1 * 1.0)
    assert cur.pass_rates[1].item() == pytest.approx(0.2)  # first observation sets it
    # tier weights follow max(min_weight, 4 m (1 - m)) with the tier mean m
    cur2 = RLCSCurriculum(5, init_pass_rates=[0.1, 0.2, 0.5, 0.6, 1.0], min_weight=0.05)
    m0, m1 = 0.15, 0.55
    expected = [4 * m0 * (1 - m0), 4 * m1 * (1 - m1), 0.05]
    assert cur2.tier_weights().tolist() == pytest.approx(expected)
    probs = cur2.item_probs()
    w = torch.tensor([expected[0]] * 2 + [expected[1]] * 2 + [expected[2]], dtype=torch.float64)
    assert torch.allclose(probs, w / w.sum())


def test_rlcs_moves_items_and_downsamples_easy() -> None:
    n = 30
    cur = RLCSCurriculum(n, init_pass_rates=[0.5] * n, ema=0.5, seed=3)
    assert (cur.tier_of() == 1).all()
    easy = list(range(10))
    for _ in range(8):  # items 0..9 become solved every time
        cur.update(easy, [1.0] * 10)
    tiers = cur.tier_of()
    assert (tiers[:10] == 2).all() and (tiers[10:] == 1).all()
    weights = cur.tier_weights()
    assert weights[2] < 0.05 * 2 < weights[1]
    probs = cur.item_probs()
    assert probs[0] < probs[15] / 5
    counts = torch.zeros(n)
    for _ in range(200):
        counts[cur.sample(5)] += 1
    assert counts[:10].sum() < 0.1 * counts.sum()
    # too hard now: items 10..19 fail repeatedly and are down-sampled as well
    for _ in range(8):
        cur.update(list(range(10, 20)), [0.0] * 10)
    assert (cur.tier_of()[10:20] == 0).all()
    assert cur.item_probs()[12] < cur.item_probs()[25] / 5


def test_rlcs_determinism_and_state_round_trip() -> None:
    a = RLCSCurriculum(50, seed=7)
    b = RLCSCurriculum(50, seed=7)
    assert [a.sample(8) for _ in range(3)] == [b.sample(8) for _ in range(3)]
    for batch in (a.sample(4), a.sample(4)):
        assert len(set(batch)) == 4
        a.update(batch, [0.25] * 4)
    state = a.state_dict()
    c = RLCSCurriculum(50, seed=123)
    c.load_state_dict(state)
    assert [a.sample(6) for _ in range(3)] == [c.sample(6) for _ in range(3)]
    with pytest.raises(ValueError, match="state is for 50 items"):
        RLCSCurriculum(49).load_state_dict(state)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"tiers": (0.0, 0.5, 0.5, 1.0)}, "strictly increasing"),
        ({"tiers": (0.1, 1.0)}, "start at 0.0"),
        ({"ema": 1.0}, "ema"),
        ({"init_pass_rates": [0.5, 0.5]}, "2 entries, expected num_items=3"),
        ({"init_pass_rates": [0.5, 2.0, 0.1]}, r"\[0, 1\]"),
        ({"min_weight": 0.0}, "min_weight"),
    ],
)
def test_rlcs_bad_init(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RLCSCurriculum(3, **kw)


def test_rlcs_bad_update_and_sample() -> None:
    cur = RLCSCurriculum(3)
    with pytest.raises(ValueError, match="2 indices but 1 pass rates"):
        cur.update([0, 1], [0.5])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\)"):
        cur.update([3], [0.5])
    with pytest.raises(ValueError, match="pass rates must lie"):
        cur.update([0], [-0.1])
    with pytest.raises(ValueError, match="batch_size"):
        cur.sample(4)


# ---------------------------------------------------------------- dynamic sampling


def test_filter_groups_and_select_balanced() -> None:
    rewards = torch.tensor([[1.0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
    assert filter_groups(rewards).tolist() == [False, False, True, True, True]
    assert not filter_groups(torch.ones(3, 1)).any()  # G = 1: nothing to compare
    assert select_balanced(rewards, 1).tolist() == [3]
    assert select_balanced(rewards, 3).tolist() == [2, 3, 4]  # tie between 2 and 4 both kept
    g = torch.Generator().manual_seed(1)
    r = torch.rand(11, 5, generator=g)
    got = select_balanced(r, 4).tolist()
    stds = [statistics_pstdev(row) for row in r.double().tolist()]
    want = sorted(sorted(range(11), key=lambda i: -stds[i])[:4])
    assert got == want
    with pytest.raises(ValueError, match=r"n must be in \[0, 5\]"):
        select_balanced(rewards, 6)
    with pytest.raises(ValueError, match="shape"):
        filter_groups(torch.ones(4))


def statistics_pstdev(row: list[float]) -> float:
    m = sum(row) / len(row)
    return math.sqrt(sum((x - m) ** 2 for x in row) / len(row))


def test_expansion_ratio_formula() -> None:
    er = ExpansionRatio(ema=0.9)
    assert er.ratio == 1.0
    ref = 1.0
    for s in (0.5, 0.75, 0.0, 1.0, 0.9):
        raw = min(8.0, 1.0 / (1.0 - s)) if s < 1 else 8.0
        ref = 0.9 * ref + 0.1 * raw
        assert er.update(s) == pytest.approx(ref)
    er0 = ExpansionRatio(ema=0.0)
    assert er0.update(0.5) == pytest.approx(2.0)
    assert er0.oversample(10) == 20
    assert er0.update(0.999) == 8.0  # capped
    er1 = ExpansionRatio(ema=0.0, init=1.1)
    assert er1.oversample(10) == 11  # float noise does not add a group
    assert er1.oversample(0) == 0
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assert er0.update_from_rewards(rewards) == pytest.approx(2.0)
    state = er.state_dict()
    fresh = ExpansionRatio()
    fresh.load_state_dict(state)
    assert fresh.ratio == er.ratio
    for bad, match in ((1.5, "share_degenerate"), (-0.1, "share_degenerate")):
        with pytest.raises(ValueError, match=match):
            er.update(bad)
    with pytest.raises(ValueError, match="max_ratio"):
        ExpansionRatio(max_ratio=0.5)


def _generator(seed: int, p_degenerate: float, g: int = 4):  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    calls: list[int] = []

    def gen(n: int) -> tuple[list[int], torch.Tensor]:
        calls.append(n)
        rows = []
        for _ in range(n):
            if rng.random() < p_degenerate:
                rows.append([float(rng.random() < 0.5)] * g)
            else:
                rows.append([1.0] + [0.0] * (g - 1))
        ids = list(range(sum(calls) - n, sum(calls)))
        return ids, torch.tensor(rows).reshape(n, g)

    return gen, calls


def test_fill_batch_plain_and_expanded() -> None:
    gen, calls = _generator(0, 0.5)
    res = DynamicSampler().fill_batch(gen, target_groups=8, max_rounds=50)
    assert len(res.groups) == 8 and res.rewards.shape == (8, 4)
    assert filter_groups(res.rewards).all()
    assert res.rounds == len(calls) and res.generated == sum(calls)
    assert calls[0] == 8
    # deterministic: every other group is degenerate, so share 0.5 -> ratio 2
    asked: list[int] = []

    def half(n: int) -> tuple[list[int], torch.Tensor]:
        asked.append(n)
        rows = [[1.0, 1.0] if i % 2 == 0 else [1.0, 0.0] for i in range(n)]
        return list(range(n)), torch.tensor(rows)

    er = ExpansionRatio(ema=0.0)
    res2 = DynamicSampler(er).fill_batch(half, target_groups=8, max_rounds=5)
    assert asked == [8, 8] and res2.rounds == 2 and er.ratio == pytest.approx(2.0)
    assert res2.groups == [1, 3, 5, 7, 1, 3, 5, 7]
    # the expansion ratio needs fewer rounds on average
    plain = expanded = 0
    for seed in range(10):
        g1, _ = _generator(seed, 0.7)
        plain += DynamicSampler().fill_batch(g1, 16, 100).rounds
        g2, _ = _generator(seed, 0.7)
        expanded += DynamicSampler(ExpansionRatio(ema=0.5)).fill_batch(g2, 16, 100).rounds
    assert expanded < plain


def test_fill_batch_shortfall() -> None:
    gen, _ = _generator(0, 1.0)
    with pytest.raises(RuntimeError, match="0/4 groups after 3 rounds"):
        DynamicSampler().fill_batch(gen, 4, max_rounds=3)
    with pytest.warns(RuntimeWarning, match="0/4 groups"):
        res = DynamicSampler(on_shortfall="warn").fill_batch(gen, 4, max_rounds=2)
    assert res.groups == [] and res.rounds == 2
    with pytest.raises(ValueError, match="3 groups but rewards of shape"):
        DynamicSampler().fill_batch(lambda n: ([0, 1, 2], torch.ones(2, 4)), 4)
    with pytest.raises(ValueError, match="on_shortfall"):
        DynamicSampler(on_shortfall="ignore")  # type: ignore[arg-type]


# ---------------------------------------------------------------- mixed-task batches


def test_mixed_counts_exact() -> None:
    tasks = {"math": list(range(0, 7)), "ocr": list(range(100, 103)), "ground": [200, 201]}
    b = MixedTaskBatcher(tasks, {"math": 0.5, "ocr": 0.3, "ground": 0.2}, batch_size=7, seed=1)
    # quotas 3.5, 2.1, 1.4 -> floors 3, 2, 1, remainder to math (0.5)
    assert b.counts == {"math": 4, "ocr": 2, "ground": 1}
    seen: dict[str, list[int]] = {t: [] for t in tasks}
    for _ in range(21):
        batch = b.next_batch()
        assert len(batch) == 7
        for task, idx in zip(b.batch_tasks(), batch, strict=True):
            assert idx in tasks[task]
            seen[task].append(idx)
    # each task walks whole epochs: every item appears equally often
    assert sorted(seen["math"]) == sorted(tasks["math"] * 12)
    assert sorted(seen["ocr"]) == sorted(tasks["ocr"] * 14)
    for bs in (1, 2, 3, 10, 11):
        m = MixedTaskBatcher(tasks, {"math": 1, "ocr": 1, "ground": 1}, batch_size=bs)
        assert sum(m.counts.values()) == bs and len(m.next_batch()) == bs


def test_mixed_determinism_and_resume() -> None:
    tasks = {"a": list(range(5)), "b": list(range(10, 19))}
    ratios = {"a": 0.25, "b": 0.75}
    x = MixedTaskBatcher(tasks, ratios, 4, seed=5)
    y = MixedTaskBatcher(tasks, ratios, 4, seed=5)
    assert [x.next_batch() for _ in range(4)] == [next(y) for _ in range(4)]
    state = x.state_dict()
    z = MixedTaskBatcher(tasks, ratios, 4, seed=5)
    z.load_state_dict(state)
    assert [x.next_batch() for _ in range(6)] == [z.next_batch() for _ in range(6)]
    other = MixedTaskBatcher(tasks, ratios, 4, seed=6)
    assert [other.next_batch() for _ in range(10)] != [
        MixedTaskBatcher(tasks, ratios, 4, seed=5).next_batch() for _ in range(10)
    ]


@pytest.mark.parametrize(
    ("tasks", "ratios", "bs", "match"),
    [
        ({"a": [1]}, {"a": -1.0}, 2, "ratio of task 'a'"),
        ({"a": [1], "b": []}, {"a": 1.0, "b": 1.0}, 2, "task 'b' has no indices"),
        ({"a": [1]}, {"b": 1.0}, 2, "differ"),
        ({"a": [1]}, {"a": 0.0}, 2, "all be zero"),
        ({"a": [1]}, {"a": 1.0}, 0, "batch_size"),
        ({}, {}, 2, "no tasks"),
    ],
)
def test_mixed_bad_input(tasks: dict, ratios: dict, bs: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MixedTaskBatcher(tasks, ratios, bs)
