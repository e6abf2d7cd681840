"""Held-out evaluation: greedy responses scored by a verifiable reward, overall and per task.

The reward is a ``reward_fn(sample, response) -> float`` (for example
:func:`vl_train.data.synthetic.verify`), wrapped by :func:`sample_reward` in a
:class:`vl_rl.rewards.SafeReward`, so a reward that raises, hangs past its timeout or returns NaN
scores 0 and is counted instead of stopping the run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .rewards import SafeReward
from .rollout import HFRolloutEngine, RolloutEngine

__all__ = [
    "REWARD_PLOT",
    "EvalResult",
    "SampleReward",
    "evaluate",
    "merge_results",
    "plot_reward_curve",
    "prompt_of",
    "sample_reward",
]

REWARD_PLOT = "reward_curve.png"

SampleReward = Callable[[dict[str, Any], str], float]
"""``reward_fn(sample, response_text) -> float``."""


def prompt_of(sample: Mapping[str, Any]) -> str:
    """The text of the sample's last user turn (what prompt-aware rewards such as code-switching read)."""
    for message in reversed(sample.get("messages", [])):
        if message["role"] == "user":
            content = message["content"]
            if isinstance(content, str):
                return content
            return " ".join(item["text"] for item in content if item.get("type") == "text")
    return ""


def sample_reward(reward_fn: SampleReward | SafeReward, timeout_s: float | None = 10.0) -> SafeReward:
    """``reward_fn(sample, response)`` as a :class:`SafeReward` (a SafeReward is returned unchanged).

    Raises:
        TypeError: ``reward_fn`` is not callable.
    """
    if isinstance(reward_fn, SafeReward):
        return reward_fn
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be callable as reward_fn(sample, response), got {type(reward_fn).__name__}")
    fn = reward_fn

    def call(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
        return float(fn(dict(sample), response))

    return SafeReward(call, timeout_s, name=getattr(fn, "__name__", type(fn).__name__))


@dataclass
class EvalResult:
    """Scores of one evaluation.

    Attributes:
        mean: Mean reward over all samples.
        per_task: Mean reward per ``sample["task"]`` (``"default"`` when absent).
        count: Responses scored per task.
        responses: The responses, in sample order (``samples_per_prompt`` per sample when sampling).
        rewards: The reward of each response.
        errors: Reward calls that failed (scored 0).
    """

    mean: float
    per_task: dict[str, float]
    count: dict[str, int]
    responses: list[str]
    rewards: list[float] = field(default_factory=list)
    errors: int = 0


def evaluate(
    model: nn.Module,
    processor: Any,
    samples: Sequence[dict[str, Any]],
    reward_fn: SampleReward | SafeReward,
    *,
    max_new_tokens: int = 64,
    thinking: bool | None = None,
    batch_size: int = 32,
    engine: RolloutEngine | None = None,
    reward_timeout: float | None = 10.0,
    greedy: bool = True,
    samples_per_prompt: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
) -> EvalResult:
    """Greedy responses to ``samples`` scored by ``reward_fn``.

    Args:
        model: The policy (ignored when ``engine`` is given).
        processor: Its processor (ignored when ``engine`` is given).
        samples: Held-out samples.
        reward_fn: ``reward_fn(sample, response) -> float``.
        max_new_tokens: Token budget (forced answers after truncated thinking are on).
        thinking: Thinking prompt on / off / per sample.
        batch_size: Prompts per generate call.
        engine: Generate with this engine instead (``greedy=True``, one response per sample).
        reward_timeout: Seconds per reward call.
        greedy: Greedy decoding (the policy's mode); False samples ``samples_per_prompt`` responses per
            sample at ``temperature`` (the policy's expected reward, what RL maximises).
        samples_per_prompt: Responses per sample when sampling (the mean reward is over all of them).
        temperature: Sampling temperature when not greedy (ignored when ``engine`` is given).
        seed: Seed of the sampled evaluation (the global RNG is restored afterwards).

    Raises:
        ValueError: No samples, ``batch_size < 1`` or ``samples_per_prompt < 1``.
    """
    if not samples or batch_size < 1 or samples_per_prompt < 1:
        raise ValueError(
            f"evaluate needs samples, batch_size >= 1 and samples_per_prompt >= 1, "
            f"got {len(samples)}, {batch_size} and {samples_per_prompt}"
        )
    safe = sample_reward(reward_fn, reward_timeout)
    errors_before = safe.errors
    runner = engine or HFRolloutEngine(
        model,
        processor,
        max_new_tokens=max_new_tokens,
        thinking=thinking,
        batch_size=batch_size,
        temperature=temperature,
    )
    k = 1 if greedy else samples_per_prompt
    responses: list[str] = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(samples), batch_size):
            responses += runner.generate(list(samples[start : start + batch_size]), k, greedy=greedy).texts
    rows = [s for s in samples for _ in range(k)]
    rewards = [safe(prompt_of(s), r, s) for s, r in zip(rows, responses, strict=True)]
    by_task: dict[str, list[float]] = defaultdict(list)
    for s, r in zip(rows, rewards, strict=True):
        by_task[str(s.get("task", "default"))].append(r)
    return EvalResult(
        mean=sum(rewards) / len(rewards),
        per_task={t: sum(v) / len(v) for t, v in sorted(by_task.items())},
        count={t: len(v) for t, v in sorted(by_task.items())},
        responses=responses,
        rewards=rewards,
        errors=safe.errors - errors_before,
    )


def plot_reward_curve(
    records: Sequence[dict[str, Any]], eval_history: Sequence[dict[str, Any]], path: str | Path
) -> Path | None:
    """Train reward per step and held-out reward per evaluation; None when matplotlib is missing."""
    from vl_train.metrics import plot_curves

    series = {
        "train reward (sampled)": [
            (r["step"], r["reward_mean"]) for r in records if isinstance(r.get("reward_mean"), float)
        ],
        "held-out reward": [(e["step"], e["eval_reward"]) for e in eval_history],
    }
    return plot_curves(series, path, ylabel="reward", markers=("held-out reward",))


def merge_results(items: Sequence[tuple[dict[str, Any], list[float], list[str]]]) -> EvalResult:
    """One :class:`EvalResult` from every rank's ``(sample, rewards, responses)``."""
    by_task: dict[str, list[float]] = {}
    rewards, responses = [], []
    for sample, values, texts in items:
        by_task.setdefault(str(sample.get("task", "default")), []).extend(values)
        rewards += values
        responses += texts
    return EvalResult(
        mean=sum(rewards) / max(len(rewards), 1),
        per_task={t: sum(v) / len(v) for t, v in sorted(by_task.items())},
        count={t: len(v) for t, v in sorted(by_task.items())},
        responses=responses,
        rewards=rewards,
    )
