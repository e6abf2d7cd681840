"""Curriculum for RL data: pass-rate filtering, RLCS difficulty tiers and mixed-task batches.

Implements
    * Qwen3-VL's reasoning-RL data filtering (Qwen3-VL technical report, RL data section): k
      rollouts per query, drop queries solved more than 90% of the time and the all-wrong ones.
    * GLM-4.5V's Reinforcement Learning with Curriculum Sampling (RLCS, GLM-4.5V report, section
      on RL): difficulty tiers from offline pass@k plus online pass rates, re-weighted every
      iteration to down-sample the too-easy and the currently-too-hard tiers.
    * Qwen3-VL's mixed-task batches with fixed per-task ratios.

Dynamic sampling (DAPO), GLM's expansion ratio and the mixed-task batcher live in
:mod:`vl_rl.sampling` (``MixedTaskBatcher`` is re-exported here).

Notation:
    N: number of queries (items); k: rollouts per query.
    p_i: pass rate of item i, the share of its rollouts counted correct, in [0, 1].
    b_0 < b_1 < ... < b_T: tier boundaries on p (b_0 = 0, b_T = 1); tier t holds
        b_t <= p < b_{t+1} (the last tier also holds p = 1).
    m_t: mean pass rate of the seen items of tier t; w_t: sampling weight of tier t.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .sampling import MixedTaskBatcher, check_finite, make_generator

__all__ = [
    "FilterResult",
    "MixedTaskBatcher",
    "RLCSCurriculum",
    "filter_dataset",
    "pass_rate_filter",
    "pass_rates_from_rewards",
]

Q = TypeVar("Q")


def pass_rates_from_rewards(rewards: torch.Tensor, correct_threshold: float = 0.5) -> torch.Tensor:
    """Share of each query's rollouts whose reward is at least ``correct_threshold``.

    Args:
        rewards: ``[N, k]`` rewards of k rollouts per query (k >= 1).
        correct_threshold: a rollout counts as correct when its reward is >= this value; 0.5 fits
            0/1 verifier rewards.

    Returns:
        ``[N]`` float64 pass rates.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be [N, k] with k >= 1, got shape {tuple(rewards.shape)}")
    check_finite(rewards, "rewards")
    return (rewards.double() >= correct_threshold).double().mean(dim=1)


def pass_rate_filter(
    scores: torch.Tensor,
    *,
    high: float = 0.9,
    drop_all_wrong: bool = True,
    correct_threshold: float = 0.5,
) -> torch.Tensor:
    """Keep mask of queries that are neither too easy nor (optionally) all wrong.

    A query is dropped when its pass rate is strictly above ``high`` ("solved more than 90%") or,
    with ``drop_all_wrong``, exactly 0. With k = 1 every pass rate is 0 or 1, so everything is
    dropped: a single rollout cannot tell a learnable query apart.

    Args:
        scores: ``[N]`` pass rates in [0, 1], or ``[N, k]`` rewards turned into pass rates with
            :func:`pass_rates_from_rewards`.
        high: pass rates above this are too easy; in [0, 1].
        drop_all_wrong: also drop queries with pass rate 0.
        correct_threshold: see :func:`pass_rates_from_rewards` (only for ``[N, k]`` input).

    Returns:
        ``[N]`` bool keep mask.
    """
    if not 0.0 <= high <= 1.0:
        raise ValueError(f"high must be in [0, 1], got {high}")
    if scores.dim() == 2:
        rates = pass_rates_from_rewards(scores, correct_threshold)
    elif scores.dim() == 1:
        check_finite(scores, "pass rates")
        rates = scores.double()
        if rates.numel() and (rates.min() < 0 or rates.max() > 1):
            raise ValueError(f"pass rates must lie in [0, 1], got min {rates.min().item()} max {rates.max().item()}")
    else:
        raise ValueError(f"scores must be [N] pass rates or [N, k] rewards, got shape {tuple(scores.shape)}")
    keep = rates <= high
    if drop_all_wrong:
        keep &= rates > 0
    return keep


@dataclass
class FilterResult:
    """Outcome of :func:`filter_dataset`.

    Attributes:
        kept: indices of the kept queries, ascending.
        pass_rates: pass rate of every query, in dataset order.
        stats: counts ``total``, ``kept``, ``too_easy``, ``all_wrong`` and ``keep_fraction``.
    """

    kept: list[int]
    pass_rates: list[float]
    stats: dict[str, float] = field(default_factory=dict)


def filter_dataset(
    queries: Sequence[Q],
    score_fn: Callable[[Q], Sequence[float]],
    *,
    high: float = 0.9,
    drop_all_wrong: bool = True,
    correct_threshold: float = 0.5,
) -> FilterResult:
    """Offline filtering: score every query with k rollouts and keep the learnable ones.

    Args:
        queries: the dataset.
        score_fn: returns the k rewards of a query's rollouts (k may differ between queries, k >= 1).
        high: As in :func:`pass_rate_filter`.
        drop_all_wrong: As in :func:`pass_rate_filter`.
        correct_threshold: As in :func:`pass_rate_filter`.

    Returns:
        The kept indices, every pass rate and counts.
    """
    rates: list[float] = []
    for i, query in enumerate(queries):
        rewards = [float(r) for r in score_fn(query)]
        if not rewards:
            raise ValueError(f"score_fn returned no rewards for query {i}")
        row = torch.tensor(rewards, dtype=torch.float64).unsqueeze(0)
        rates.append(float(pass_rates_from_rewards(row, correct_threshold)[0]))
    rate_t = torch.tensor(rates, dtype=torch.float64)
    keep = pass_rate_filter(rate_t, high=high, drop_all_wrong=drop_all_wrong)
    total = len(rates)
    stats = {
        "total": float(total),
        "kept": float(int(keep.sum())),
        "too_easy": float(int((rate_t > high).sum())),
        "all_wrong": float(int((rate_t == 0).sum())),
        "keep_fraction": float(keep.double().mean()) if total else 0.0,
    }
    return FilterResult(kept=keep.nonzero().flatten().tolist(), pass_rates=rates, stats=stats)


class RLCSCurriculum:
    """GLM-4.5V RLCS: difficulty tiers from offline and online pass rates, re-weighted each step.

    Weighting function (**our choice**, the report does not publish one): the weight of tier t is
    ``w_t = max(min_weight, 4 m_t (1 - m_t))``, with m_t the mean pass rate of the tier's seen
    items. 4 p (1 - p) peaks at 1 for p = 0.5 and is the (scaled) Bernoulli variance of the reward,
    i.e. how much group-relative signal a query gives; it vanishes for always-solved (too easy) and
    currently never-solved (too hard) items, and ``min_weight`` keeps them reachable so their pass
    rates can still move. Unseen items (no offline or online pass rate) have weight 1 so they are
    explored first. Each item is drawn with probability proportional to its tier's weight, without
    replacement within a batch.

    Online updates: the first observation of an item sets its pass rate; later ones are smoothed,
    ``p <- ema * p + (1 - ema) * p_new``.

    Args:
        num_items: dataset size N.
        tiers: boundaries b_0 = 0 < ... < b_T = 1 on the pass rate (T tiers).
        ema: smoothing of online pass rates, in [0, 1).
        init_pass_rates: optional ``[N]`` offline pass@k rates (NaN = unknown).
        min_weight: floor of a tier weight, in (0, 1].
        seed: seed of the sampler's generator.
    """

    def __init__(
        self,
        num_items: int,
        *,
        tiers: Sequence[float] = (0.0, 0.3, 0.7, 1.0),
        ema: float = 0.9,
        init_pass_rates: torch.Tensor | Sequence[float] | None = None,
        min_weight: float = 0.05,
        seed: int = 0,
    ) -> None:
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        bounds = [float(b) for b in tiers]
        if len(bounds) < 2 or bounds[0] != 0.0 or bounds[-1] != 1.0:
            raise ValueError(f"tiers must start at 0.0 and end at 1.0 (>= 2 entries), got {bounds}")
        if any(b >= c for b, c in itertools.pairwise(bounds)):
            raise ValueError(f"tiers must be strictly increasing, got {bounds}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if not 0.0 < min_weight <= 1.0:
            raise ValueError(f"min_weight must be in (0, 1], got {min_weight}")
        self.num_items = num_items
        self.boundaries = bounds
        self.ema = ema
        self.min_weight = min_weight
        self.seed = seed
        self.pass_rates = torch.full((num_items,), float("nan"), dtype=torch.float64)
        if init_pass_rates is not None:
            init = torch.as_tensor(init_pass_rates, dtype=torch.float64).flatten()
            if init.numel() != num_items:
                raise ValueError(f"init_pass_rates has {init.numel()} entries, expected num_items={num_items}")
            known = init[~init.isnan()]
            if known.numel() and (known.min() < 0 or known.max() > 1 or known.isinf().any()):
                raise ValueError("init_pass_rates must lie in [0, 1] (NaN for unknown)")
            self.pass_rates = init.clone()
        self._gen = make_generator(seed)
        self.steps = 0

    @property
    def num_tiers(self) -> int:
        """Number of tiers T."""
        return len(self.boundaries) - 1

    def update(self, indices: Sequence[int] | torch.Tensor, pass_rates: Any) -> None:
        """Fold online pass rates of the given items into their running estimates.

        Args:
            indices: item ids (repeats are applied in order).
            pass_rates: one pass rate in [0, 1] per index (a sequence or ``[n]`` tensor).
        """
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        rates = torch.as_tensor(pass_rates, dtype=torch.float64).flatten()
        if idx.numel() != rates.numel():
            raise ValueError(f"got {idx.numel()} indices but {rates.numel()} pass rates")
        check_finite(rates, "pass rates")
        if rates.numel() and (rates.min() < 0 or rates.max() > 1):
            raise ValueError(f"pass rates must lie in [0, 1], got {rates.tolist()}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_items):
            raise ValueError(f"indices must lie in [0, {self.num_items}), got {idx.tolist()}")
        for i, r in zip(idx.tolist(), rates.tolist(), strict=True):
            old = float(self.pass_rates[i])
            new = r if math.isnan(old) else self.ema * old + (1.0 - self.ema) * r
            self.pass_rates[i] = new
        self.steps += 1

    def tier_of(self) -> torch.Tensor:
        """``[N]`` long tier of each item; -1 for unseen items."""
        out = torch.full((self.num_items,), -1, dtype=torch.long)
        last = self.num_tiers - 1
        for i, p in enumerate(self.pass_rates.tolist()):
            if not math.isnan(p):
                out[i] = min(bisect.bisect_right(self.boundaries, p) - 1, last)
        return out

    def tier_weights(self) -> torch.Tensor:
        """``[T]`` float64 weights w_t (see the class docstring); empty tiers get ``min_weight``."""
        tiers = self.tier_of()
        weights = torch.full((self.num_tiers,), self.min_weight, dtype=torch.float64)
        for t in range(self.num_tiers):
            members = tiers == t
            if members.any():
                m = float(self.pass_rates[members].mean())
                weights[t] = max(self.min_weight, 4.0 * m * (1.0 - m))
        return weights

    def item_probs(self) -> torch.Tensor:
        """``[N]`` float64 probability of drawing each item as the first of a batch."""
        tiers = self.tier_of()
        weights = self.tier_weights()
        item_w = torch.ones(self.num_items, dtype=torch.float64)
        seen = tiers >= 0
        item_w[seen] = weights[tiers[seen]]
        return item_w / item_w.sum()

    def sample(self, batch_size: int) -> list[int]:
        """Draw ``batch_size`` distinct item ids; deterministic given the seed and the state."""
        if not 1 <= batch_size <= self.num_items:
            raise ValueError(f"batch_size must be in [1, {self.num_items}], got {batch_size}")
        picks = torch.multinomial(self.item_probs(), batch_size, replacement=False, generator=self._gen)
        return picks.tolist()

    def state_dict(self) -> dict[str, Any]:
        """Pass rates, step count and the generator state."""
        return {
            "num_items": self.num_items,
            "pass_rates": self.pass_rates.clone(),
            "steps": self.steps,
            "rng": self._gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the item count must match."""
        if state["num_items"] != self.num_items:
            raise ValueError(f"state is for {state['num_items']} items, this curriculum has {self.num_items}")
        self.pass_rates = state["pass_rates"].clone().to(torch.float64)
        self.steps = int(state["steps"])
        self._gen.set_state(state["rng"])
