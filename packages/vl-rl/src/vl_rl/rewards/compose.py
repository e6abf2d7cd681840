"""Reward composition: the reward protocol, weighted sums, per-task routing, safe execution.

Qwen3-VL trains on mixed-task batches where each task has its own verifier plus shared penalties
(REFERENCE.md section 5). A reward function is any callable ``(prompt, response, sample) -> float``.

- ``combine({name: (fn, weight)})``: ``R = sum_k w_k r_k``; ``components`` gives the parts for logging.
- ``route_by_task({task: fn}, key="task")``: calls the function of ``sample[key]``.
- ``safe_reward(fn, timeout_s)``: a reward that raises, hangs past the timeout or returns a
  non-finite value gives 0 and increments ``errors`` / ``timeouts`` (exposed for logging). With a
  timeout the calls run in a persistent worker process (``isolation="process"``, see ``_worker``)
  that is killed when a call runs past it, so CPU-bound work holding the GIL (sympy) is stopped too;
  ``isolation="thread"`` runs them in a daemon thread that is abandoned instead (for judges whose
  model lives on this process's GPU, or rewards whose in-process state must change). Code-execution
  rewards still need their own sandbox with memory limits.

Empty or truncated responses never raise in the provided verifiers (they score 0); ``safe_reward``
is the net for everything else.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from vl_rl.rewards import _worker
from vl_rl.rewards._reasons import collect_reasons
from vl_rl.rewards._timeout import RewardTimeoutError, call_with_timeout

__all__ = [
    "CombinedReward",
    "Isolation",
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


Isolation = Literal["process", "thread"]
"""Where :class:`SafeReward` runs a call that has a timeout: a killable worker process, or a daemon thread."""


def _with_reasons(fn: RewardFunction, args: tuple[Any, ...]) -> tuple[Any, list[str]]:
    with collect_reasons() as reasons:
        return fn(*args), reasons


class SafeReward:
    """A reward that never raises: failures give ``fallback`` and are counted (built by :func:`safe_reward`).

    Args:
        fn: The reward.
        timeout_s: Seconds a call may take; None calls ``fn`` directly (no time limit).
        fallback: The reward of a failed call.
        name: Name in metrics (default: the function's name).
        isolation: With a timeout, ``"process"`` (default) runs calls in a persistent worker process
            that is killed and restarted when a call times out; ``"thread"`` runs them in a daemon
            thread that is abandoned on timeout (cannot stop CPU-bound work; for judges whose model
            is on this process's GPU, or rewards whose in-process state must change).
        start_method: The worker's start method (``"fork"``, ``"spawn"``, ``"forkserver"``); None
            picks ``"fork"`` on Linux (any callable works) and ``"spawn"`` elsewhere (``fn`` must be
            picklable).

    Attributes:
        calls: Calls made.
        errors: Calls that raised, timed out or returned a non-finite value.
        timeouts: Calls that timed out (also counted in ``errors``).
        last_error: ``repr`` of the latest failure, for logs.
        reasons: Counts of the reason codes of zero rewards (``vl_rl.rewards.collect_reasons``).

    Raises:
        ValueError: A non-positive timeout or an unknown isolation / start method.
        TypeError: ``fn`` is not callable, or cannot be pickled for a spawned worker.
    """

    def __init__(
        self,
        fn: RewardFunction,
        timeout_s: float | None = None,
        fallback: float = 0.0,
        name: str | None = None,
        *,
        isolation: Isolation = "process",
        start_method: str | None = None,
    ) -> None:
        _check_callable(name or "fn", fn)
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
        if isolation not in ("process", "thread"):
            raise ValueError(f"isolation must be 'process' or 'thread', got {isolation!r}")
        self.fn = fn
        self.timeout_s = timeout_s
        self.fallback = fallback
        self.name = str(name or getattr(fn, "__name__", type(fn).__name__))
        self.isolation: Isolation = isolation
        self.start_method = start_method
        self.calls = 0
        self.errors = 0
        self.timeouts = 0
        self.last_error: str | None = None
        self.reasons: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._runner: _worker.ProcessRunner | None = None
        if timeout_s is not None and isolation == "process":
            self._runner = _worker.ProcessRunner(fn, start_method=start_method, name=self.name)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _fail(self, error: str, timeout: bool = False) -> float:
        with self._lock:
            self.errors += 1
            self.timeouts += int(timeout)
            self.last_error = error
        return self.fallback

    def _call(self, args: tuple[Any, ...]) -> tuple[Any, list[str]]:
        if self.timeout_s is None:
            return _with_reasons(self.fn, args)
        if self._runner is not None and _worker.may_start_processes():
            return self._runner.call(args, self.timeout_s)
        # in a thread: inside another SafeReward's worker or any daemonic process (which may not
        # start processes), the enclosing process's own time limit is what stops CPU-bound work
        return call_with_timeout(_with_reasons, (self.fn, args), self.timeout_s)

    def __call__(self, prompt: str, response: str, sample: Mapping[str, Any]) -> float:
        with self._lock:
            self.calls += 1
        try:
            raw, reasons = self._call((prompt, response, sample))
            value = float(raw)
        except RewardTimeoutError as exc:
            return self._fail(repr(exc), timeout=True)
        except Exception as exc:
            return self._fail(repr(exc))
        if reasons:
            with self._lock:
                self.reasons.update(reasons)
        if not math.isfinite(value):
            return self._fail(f"non-finite reward {value}")
        return value

    def close(self) -> None:
        """Stop the worker process, if any (a later call starts a new one)."""
        if self._runner is not None:
            self._runner.close()

    def metrics(self) -> dict[str, float]:
        """Counters for logging, prefixed with the reward's name: errors, timeouts, zero-reward reasons."""
        out = {f"reward/{self.name}/errors": float(self.errors), f"reward/{self.name}/timeouts": float(self.timeouts)}
        out.update({f"reward/{self.name}/zero/{reason}": float(n) for reason, n in sorted(self.reasons.items())})
        return out


def safe_reward(
    fn: RewardFunction,
    timeout_s: float | None = None,
    *,
    fallback: float = 0.0,
    name: str | None = None,
    isolation: Isolation = "process",
    start_method: str | None = None,
) -> SafeReward:
    """Wraps ``fn`` so it returns ``fallback`` (0) instead of raising, hanging or returning NaN.

    See :class:`SafeReward` for the arguments; with ``timeout_s`` the calls run in a worker process
    that is killed on timeout (``isolation="process"``).
    """
    return SafeReward(fn, timeout_s, fallback, name, isolation=isolation, start_method=start_method)


def score_batch(
    fn: RewardFunction, prompts: Sequence[str], responses: Sequence[str], samples: Sequence[Mapping[str, Any]]
) -> list[float]:
    """``[fn(p, r, s) ...]`` over aligned sequences (lengths checked)."""
    if not len(prompts) == len(responses) == len(samples):
        raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(responses)} responses, {len(samples)} samples")
    return [float(fn(p, r, s)) for p, r, s in zip(prompts, responses, samples)]
