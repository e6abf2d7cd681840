"""Batch-level sampling for RL: DAPO dynamic sampling, GLM-4.5V expansion ratio, mixed-task batches.

Implements
    * DAPO dynamic sampling (arXiv 2503.14476, section 3.2): drop groups whose accuracy is 0 or 1
      (all G rewards equal, so every advantage is 0) and keep generating until the batch is full.
    * GLM-4.5V's dynamic-sampling expansion (GLM-4.5V report, RL section): over-sample by
      ratio = 1 / (1 - share of all-correct-or-all-wrong groups), smoothed by an EMA, then keep the
      most balanced groups.
    * Qwen3-VL's mixed-task batches with fixed per-task ratios.

Notation:
    N: number of groups (prompts); G: responses per group.
    R [N, G]: rewards; a group is *degenerate* when all its G rewards are equal (for 0/1 rewards:
        accuracy 0 or 1).
    s: share of degenerate groups in a round; rho: expansion ratio.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = [
    "DynamicSampler",
    "ExpansionRatio",
    "FillResult",
    "MixedTaskBatcher",
    "filter_groups",
    "select_balanced",
]


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ValueError when ``x`` holds NaN or inf."""
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf")


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def _check_groups(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be [N, G] with G >= 1, got shape {tuple(rewards.shape)}")
    check_finite(rewards, "rewards")


def filter_groups(rewards: torch.Tensor) -> torch.Tensor:
    """DAPO keep mask: groups whose rewards are not all equal (accuracy neither 0 nor 1).

    Args:
        rewards: ``[N, G]`` rewards. With G = 1 every group is degenerate.

    Returns:
        ``[N]`` bool mask, True for groups that carry a learning signal.
    """
    _check_groups(rewards)
    return rewards.amax(dim=1) != rewards.amin(dim=1)


def select_balanced(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` most balanced groups: highest population std of the rewards.

    For 0/1 rewards the std is sqrt(p (1 - p)), so this keeps the groups whose accuracy p is closest
    to 50%. Ties go to the lower index; the result is sorted ascending (original order).

    Args:
        rewards: ``[N, G]`` rewards.
        n: number of groups to keep, 0 <= n <= N.

    Returns:
        ``[n]`` long indices.
    """
    _check_groups(rewards)
    if not 0 <= n <= rewards.shape[0]:
        raise ValueError(f"n must be in [0, {rewards.shape[0]}], got {n}")
    std = rewards.double().std(dim=1, correction=0)
    order = torch.argsort(-std, stable=True)
    return order[:n].sort().values


class ExpansionRatio:
    """GLM-4.5V over-sampling factor, an EMA of 1 / (1 - s).

    ``update(s)`` computes raw = 1 / (1 - s), capped at ``max_ratio`` (s -> 1 would otherwise blow
    up: with every group degenerate there is no finite factor that fixes the batch, so we cap;
    8 by default, **our choice**), then ``ratio <- ema * ratio + (1 - ema) * raw``. The ratio starts
    at ``init`` (1.0: no over-sampling before any evidence).

    Args:
        ema: smoothing in [0, 1); 0 uses the latest raw value.
        max_ratio: cap of the raw value, >= 1.
        init: starting ratio, in [1, max_ratio].
    """

    def __init__(self, ema: float = 0.9, *, max_ratio: float = 8.0, init: float = 1.0) -> None:
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        if max_ratio < 1.0:
            raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
        if not 1.0 <= init <= max_ratio:
            raise ValueError(f"init must be in [1, max_ratio={max_ratio}], got {init}")
        self.ema = ema
        self.max_ratio = max_ratio
        self.ratio = float(init)

    def update(self, share_degenerate: float) -> float:
        """Fold in the share of degenerate groups of one round; returns the new ratio."""
        s = float(share_degenerate)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"share_degenerate must be in [0, 1], got {share_degenerate}")
        raw = self.max_ratio if s >= 1.0 else min(self.max_ratio, 1.0 / (1.0 - s))
        self.ratio = self.ema * self.ratio + (1.0 - self.ema) * raw
        return self.ratio

    def update_from_rewards(self, rewards: torch.Tensor) -> float:
        """:meth:`update` with the degenerate share of ``[N, G]`` rewards."""
        keep = filter_groups(rewards)
        if keep.numel() == 0:
            raise ValueError("rewards hold no groups")
        return self.update(1.0 - float(keep.double().mean()))

    def oversample(self, n: int) -> int:
        """Number of groups to generate to end with about ``n`` useful ones: ceil(n * ratio)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        # the 1e-9 keeps float noise (e.g. 10 * 1.1 = 11.000000000000002) from adding a group
        return math.ceil(n * self.ratio - 1e-9)

    def state_dict(self) -> dict[str, float]:
        """The current ratio."""
        return {"ratio": self.ratio}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Restore a :meth:`state_dict`."""
        self.ratio = float(state["ratio"])


@dataclass
class FillResult:
    """Outcome of :meth:`DynamicSampler.fill_batch`.

    Attributes:
        groups: the kept groups (at most ``target_groups``), in generation order.
        rewards: ``[len(groups), G]`` their rewards.
        rounds: generation rounds used.
        generated: total groups generated.
    """

    groups: list[Any]
    rewards: torch.Tensor
    rounds: int
    generated: int


class DynamicSampler:
    """DAPO resample-until-full, optionally over-sampling with a GLM :class:`ExpansionRatio`.

    Args:
        expansion: when given, each round asks for ``expansion.oversample(missing)`` groups and the
            ratio is updated with that round's degenerate share.
        on_shortfall: ``"raise"`` (RuntimeError) or ``"warn"`` (returns the partial batch) when
            ``max_rounds`` rounds did not fill the batch.
    """

    def __init__(
        self,
        expansion: ExpansionRatio | None = None,
        *,
        on_shortfall: Literal["raise", "warn"] = "raise",
    ) -> None:
        if on_shortfall not in ("raise", "warn"):
            raise ValueError(f"on_shortfall must be 'raise' or 'warn', got {on_shortfall!r}")
        self.expansion = expansion
        self.on_shortfall = on_shortfall

    filter_groups = staticmethod(filter_groups)

    def fill_batch(
        self,
        generate_groups_fn: Callable[[int], tuple[Sequence[Any], torch.Tensor]],
        target_groups: int,
        max_rounds: int = 8,
        *,
        agree: Callable[[int, Callable[..., Any]], int] | None = None,
    ) -> FillResult:
        """Generate rounds of groups until ``target_groups`` non-degenerate ones are collected.

        Args:
            generate_groups_fn: ``n -> (groups, rewards [len(groups), G])``; may return any number
                of groups (the extra ones are discarded once the batch is full).
            target_groups: groups wanted, >= 1.
            max_rounds: rounds allowed, >= 1.
            agree: ``(value, op) -> op of value over every rank`` (``op`` is ``max`` or ``sum``) when
                several ranks fill their own batches with a sharded model: generating is a collective
                there, so every rank then runs as many rounds, each asking for as many groups, until
                every rank is full (a full rank's extra groups are discarded), and the expansion ratio
                learns from every rank's groups (the same ratio everywhere).

        Returns:
            The kept groups, their rewards and the number of rounds used.
        """
        if target_groups < 1 or max_rounds < 1:
            raise ValueError(f"target_groups and max_rounds must be >= 1, got {target_groups}, {max_rounds}")
        every = agree if agree is not None else (lambda value, op: value)
        kept: list[Any] = []
        kept_rewards: list[torch.Tensor] = []
        generated = 0
        rounds = 0
        while rounds < max_rounds and every(target_groups - len(kept), max) > 0:
            missing = target_groups - len(kept)
            ask = self.expansion.oversample(missing) if self.expansion else missing
            groups, rewards = generate_groups_fn(every(ask, max))
            rounds += 1
            if len(groups) != rewards.shape[0] or rewards.dim() != 2:
                raise ValueError(
                    f"generate_groups_fn returned {len(groups)} groups but rewards of shape {tuple(rewards.shape)}"
                )
            generated += len(groups)
            keep = filter_groups(rewards) if len(groups) else torch.zeros(0, dtype=torch.bool)
            total = every(len(groups), sum)
            if self.expansion is not None and total:
                self.expansion.update(every(int((~keep).sum()), sum) / total)
            for i in keep.nonzero().flatten().tolist()[:missing]:
                kept.append(groups[i])
                kept_rewards.append(rewards[i])
        if len(kept) < target_groups:
            msg = (
                f"dynamic sampling filled {len(kept)}/{target_groups} groups after {rounds} rounds "
                f"({generated} generated): too many all-correct/all-wrong groups"
            )
            if self.on_shortfall == "raise":
                raise RuntimeError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        stacked = torch.stack(kept_rewards) if kept_rewards else torch.empty(0, 0)
        return FillResult(groups=kept, rewards=stacked, rounds=rounds, generated=generated)


class MixedTaskBatcher:
    """Batches with fixed per-task counts (Qwen3-VL mixed-task RL batches).

    Per-batch counts come from ``ratios`` by largest-remainder rounding (ties to the task listed
    first), so every batch has exactly ``batch_size`` items and the same counts. Each task walks a
    seeded permutation of its indices and reshuffles (a new epoch) when exhausted; a batch may hold
    the same item twice only when a task's count exceeds its size. Batches are laid out task by
    task in ``ratios`` order.

    Args:
        task_to_indices: non-empty index list per task.
        ratios: non-negative weight per task (same keys; normalised; not all zero).
        batch_size: items per batch, >= 1.
        seed: seed of the permutations.
    """

    def __init__(
        self,
        task_to_indices: Mapping[str, Sequence[int]],
        ratios: Mapping[str, float],
        batch_size: int,
        seed: int = 0,
    ) -> None:
        if set(task_to_indices) != set(ratios):
            raise ValueError(f"tasks {sorted(task_to_indices)} and ratio keys {sorted(ratios)} differ")
        if not ratios:
            raise ValueError("no tasks given")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for task, r in ratios.items():
            if not math.isfinite(r) or r < 0:
                raise ValueError(f"ratio of task {task!r} must be finite and >= 0, got {r}")
        total = sum(ratios.values())
        if total <= 0:
            raise ValueError(f"ratios must not all be zero, got {dict(ratios)}")
        self.tasks = list(ratios)
        quotas = [ratios[t] / total * batch_size for t in self.tasks]
        counts = [math.floor(q) for q in quotas]
        by_remainder = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
        for i in by_remainder[: batch_size - sum(counts)]:
            counts[i] += 1
        self.counts = dict(zip(self.tasks, counts, strict=True))
        for task in self.tasks:
            if len(task_to_indices[task]) == 0:
                raise ValueError(f"task {task!r} has no indices")
        self.indices = {t: [int(i) for i in task_to_indices[t]] for t in self.tasks}
        self.batch_size = batch_size
        self.seed = seed
        self.batches = 0
        self._cursor = {t: (0, 0) for t in self.tasks}  # (epoch, position)
        self._perm_cache: dict[str, tuple[int, list[int]]] = {}

    def _perm(self, task: str, epoch: int) -> list[int]:
        cached = self._perm_cache.get(task)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        # crc32, not hash(): str hashes change between processes, which would break resume
        key = (self.seed * 1_000_003 + zlib.crc32(task.encode()) * 7919 + epoch) % (2**63)
        perm = torch.randperm(len(self.indices[task]), generator=make_generator(key)).tolist()
        self._perm_cache[task] = (epoch, perm)
        return perm

    def batch_tasks(self) -> list[str]:
        """Task of each position of a batch (the same for every batch)."""
        return [t for t in self.tasks for _ in range(self.counts[t])]

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` indices; deterministic given the seed and the state."""
        out: list[int] = []
        for task in self.tasks:
            epoch, pos = self._cursor[task]
            items = self.indices[task]
            for _ in range(self.counts[task]):
                if pos == len(items):
                    epoch, pos = epoch + 1, 0
                out.append(items[self._perm(task, epoch)[pos]])
                pos += 1
            self._cursor[task] = (epoch, pos)
        self.batches += 1
        return out

    def __iter__(self) -> MixedTaskBatcher:
        return self

    def __next__(self) -> list[int]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Batch count and each task's (epoch, position)."""
        return {"batches": self.batches, "cursor": {t: list(c) for t, c in self._cursor.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the task set must match."""
        if set(state["cursor"]) != set(self.tasks):
            raise ValueError(f"state tasks {sorted(state['cursor'])} differ from {sorted(self.tasks)}")
        self.batches = int(state["batches"])
        self._cursor = {t: (int(e), int(p)) for t, (e, p) in state["cursor"].items()}
