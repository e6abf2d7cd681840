"""Reward composition: the reward protocol, weighted sums, per-task routing, safe execution.

Qwen3-VL trains on mixed-task batches where each task has its own verifier plus shared penalties
(REFERENCE.md section 5). A reward function is any callable ``(prompt, response, sample) -> float``.

- ``combine({name: (fn, weight)})``: ``R = sum_k w_k r_k``; ``components`` gives the parts for logging.
- ``route_by_task({task: fn}, key="task")``: calls the function of ``sample[key]``.
- ``safe_reward(fn, timeout_s)``: a reward that raises, hangs past the timeout or returns a
  non-finite value gives 0 and increments ``errors`` / ``timeouts`` (exposed for logging). A hung
  call runs in an abandoned daemon thread (threads cannot be killed); code-execution rewards must
  use a subprocess with time and memory limits instead.

Empty or truncated responses never raise in the provided verifiers (they score 0); ``safe_reward``
is the net for everything else.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from vl_rl.rewards._timeout import RewardTimeoutError, call_with_timeout

__all__ = [
    "CombinedReward",
    "RewardFunction",
    "SafeReward",
    "TaskRouter",
    "combine",
    "route_by_task",
    "safe_reward",
    "score_batch",
]


@runtime_checkable
class RewardFunction(Protocol):
    """``(prompt, response, sample) -> float``; ``sample`` holds the reference and metadata."""

    def __call__(self, prompt: str, response: str, sample: Mapping[str, Any], /) -> float: ...


def _check_callable(name: str, fn: Any) -> None:
    if not callable(fn):
        raise TypeError(f"reward {name!r} is not callable: {fn!r}")


class CombinedReward:
    """Weighted sum of named rewards (built by :func:`combine`)."""

    def __init__(self, parts: Mapping[str, tuple[RewardFunction, float]]) -> None:
        if not parts:
            raise ValueError("combine needs at least one reward")
        for name, part in parts.items():
            if not isinstance(part, tuple) or len(part) != 2:
                raise ValueError(f"reward {name!r} must be (fn, weight), got {part!r}")
            _check_callable(name, part[0])
            if not math.isfinite(float(part[1])):
                raise ValueError(f"reward {name!r} has a non-finite weight {part[1]}")
        self.parts = {name: (fn, float(w)) for name, (fn, w) in parts.items()}

    def components(self, prompt: str, response: str, sample: Mapping[str, Any]) -> dict[str, float]:
        """Each unweighted part's value, by name."""
        return {name: float(fn(prompt, response, sample)) for name, (fn, _) in self.parts.items()}

    def __call__(self, prompt: str, response: str, sample: Mapping[str, Any]) -> float:
        values = self.components(prompt, response, sample)
        return sum(self.parts[name][1] * value for name, value in values.items())


def combine(parts: Mapping[str, tuple[RewardFunction, float]]) -> CombinedReward:
    """``R = sum_k w_k r_k`` over ``{name: (fn, weight)}``."""
    return CombinedReward(parts)


class TaskRouter:
    """Dispatches on ``sample[key]`` (built by :func:`route_by_task`)."""

    def __init__(
        self, routes: Mapping[str, RewardFunction], key: str = "task", default: RewardFunction | None = None
    ) -> None:
        if not routes and default is None:
            raise ValueError("route_by_task needs at least one route or a default")
        for name, fn in routes.items():
            _check_callable(name, fn)
        self.routes = dict(routes)
        self.key = key
        self.default = default

    def __call__(self, prompt: str, response: str, sample: Mapping[str, Any]) -> float:
        task = sample.get(self.key)
        fn = self.routes.get(task) if isinstance(task, str) else None
        if fn is None:
            if self.default is None:
                raise ValueError(f"no reward for {self.key}={task!r}; routes are {sorted(self.routes)}")
            fn = self.default
        return fn(prompt, response, sample)


def route_by_task(
    routes: Mapping[str, RewardFunction], *, key: str = "task", default: RewardFunction | None = None
) -> TaskRouter:
    """Per-task routing; an unknown task without ``default`` raises a ``ValueError`` naming it."""
    return TaskRouter(routes, key, default)


class SafeReward:
    """A reward that never raises: failures give ``fallback`` and are counted (built by :func:`safe_reward`).

    Attributes:
        calls: Calls made.
        errors: Calls that raised, timed out or returned a non-finite value.
        timeouts: Calls that timed out (also counted in ``errors``).
        last_error: ``repr`` of the latest failure, for logs.
    """

    def __init__(
        self, fn: RewardFunction, timeout_s: float | None = None, fallback: float = 0.0, name: str | None = None
    ) -> None:
        _check_callable(name or "fn", fn)
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        self.fn = fn
        self.timeout_s = timeout_s
        self.fallback = fallback
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self.calls = 0
        self.errors = 0
        self.timeouts = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()

    def _fail(self, error: str, timeout: bool = False) -> float:
        with self._lock:
            self.errors += 1
            self.timeouts += int(timeout)
            self.last_error = error
        return self.fallback

    def __call__(self, prompt: str, response: str, sample: Mapping[str, Any]) -> float:
        with self._lock:
            self.calls += 1
        try:
            value = call_with_timeout(self.fn, (prompt, response, sample), self.timeout_s)
            value = float(value)
        except RewardTimeoutError as exc:
            return self._fail(repr(exc), timeout=True)
        except Exception as exc:
            return self._fail(repr(exc))
        if not math.isfinite(value):
            return self._fail(f"non-finite reward {value}")
        return value

    def metrics(self) -> dict[str, float]:
        """Counters for logging, prefixed with the reward's name."""
        return {f"reward/{self.name}/errors": float(self.errors), f"reward/{self.name}/timeouts": float(self.timeouts)}


def safe_reward(
    fn: RewardFunction, timeout_s: float | None = None, *, fallback: float = 0.0, name: str | None = None
) -> SafeReward:
    """Wraps ``fn`` so it returns ``fallback`` (0) instead of raising, hanging or returning NaN."""
    return SafeReward(fn, timeout_s, fallback, name)


def score_batch(
    fn: RewardFunction, prompts: Sequence[str], responses: Sequence[str], samples: Sequence[Mapping[str, Any]]
) -> list[float]:
    """``[fn(p, r, s) ...]`` over aligned sequences (lengths checked)."""
    if not len(prompts) == len(responses) == len(samples):
        raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(responses)} responses, {len(samples)} samples")
    return [float(fn(p, r, s)) for p, r, s in zip(prompts, responses, samples)]
