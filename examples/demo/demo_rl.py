"""The demo's RL stage: SAPO on the counting and colour prompts, reward = the synthetic verifier.

Runs ``vl_rl.trainer.RLTrainer`` (rollouts with the HF engine, group advantages, the SAPO policy loss)
on training-split prompts of the target tasks, and measures the held-out reward of those tasks before
and after with greedy decoding. The reward is ``vl_train.data.synthetic.verify``, which the trainer wraps
in a ``vl_rl.rewards.SafeReward`` (a raising reward scores 0 and is counted instead of stopping the run).

The stage is skipped, with a message, when ``vl_rl.trainer`` cannot be imported.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from demo_eval import evaluate_samples

__all__ = ["RLRun", "RLSpec", "record_rewards", "rl_available", "run_rl"]

_REWARD_KEYS = ("reward_mean", "reward/mean", "reward", "rewards/mean", "train/reward")


@dataclass
class RLSpec:
    """Settings of the RL stage (``vl_rl.config.RLConfig`` fields and the prompts).

    Attributes:
        method: Policy loss (``"sapo"`` by default).
        tasks: Tasks whose training prompts are used and whose held-out reward is reported.
        steps: RL steps.
        prompts_per_step: Prompts per step.
        group_size: Responses per prompt.
        lr: Peak learning rate.
        temperature: Sampling temperature of the rollouts.
        max_new_tokens: Tokens per response.
        eval_size: Held-out prompts per task for the before/after reward.
        train_size: Training prompts per task.
        image_size_range: Image sides of the prompts.
        extra: More ``RLConfig`` fields.
    """

    method: str = "sapo"
    tasks: tuple[str, ...] = ("count", "colour")
    steps: int = 60
    prompts_per_step: int = 8
    group_size: int = 8
    lr: float = 1e-4
    temperature: float = 1.0
    max_new_tokens: int = 8
    eval_size: int = 50
    train_size: int = 2000
    image_size_range: tuple[int, int] = (96, 128)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RLRun:
    """What the RL stage produced.

    Attributes:
        seconds: Wall time of the training.
        rewards: Mean training reward per step.
        evals: ``(step, held-out reward)`` points.
        before: Held-out reward of the target tasks before RL.
        after: Held-out reward after RL.
        output_dir: The stage's folder.
    """

    seconds: float
    rewards: list[float]
    evals: list[tuple[int, float]]
    before: float
    after: float
    output_dir: Path


def rl_available() -> bool:
    """Whether ``vl_rl.trainer.RLTrainer`` and ``vl_rl.config.RLConfig`` import."""
    if importlib.util.find_spec("vl_rl.trainer") is None:
        return False
    try:
        from vl_rl.config import RLConfig  # noqa: F401
        from vl_rl.trainer import RLTrainer  # noqa: F401
    except ImportError:
        return False
    return True


def record_rewards(records: Sequence[dict[str, Any]]) -> list[float]:
    """The mean training reward of every step record (the first reward key found in each).

    Raises:
        ValueError: Records without any known reward key.
    """
    out = []
    for record in records:
        key = next((k for k in _REWARD_KEYS if isinstance(record.get(k), (int, float))), None)
        if key is not None and math.isfinite(float(record[key])):
            out.append(float(record[key]))
    if records and not out:
        raise ValueError(f"no reward in the RL records (looked for {list(_REWARD_KEYS)}; keys: {sorted(records[0])})")
    return out


def _samples(split: Literal["train", "heldout"], size: int, spec: RLSpec, seed: int) -> list[dict[str, Any]]:
    from vl_train.data.synthetic import SyntheticDataset

    ds = SyntheticDataset(
        split,
        size=size * len(spec.tasks),
        seed=seed,
        tasks=list(spec.tasks),
        image_size_range=spec.image_size_range,
        thinking=0.0,
    )
    return list(ds)


def _target_reward(model: Any, processor: Any, samples: list[dict[str, Any]], spec: RLSpec, progress: bool) -> float:
    return evaluate_samples(
        model, processor, samples, max_new_tokens=spec.max_new_tokens, progress=progress, desc="eval RL tasks"
    ).mean


def run_rl(
    model: Any, processor: Any, spec: RLSpec, output_dir: Path, *, seed: int = 0, progress: bool = True
) -> RLRun:
    """Train ``model`` in place with RL and return the reward curve and the held-out reward before/after.

    Raises:
        ImportError: ``vl_rl.trainer`` is not importable (check :func:`rl_available` first).
    """
    from vl_rl.config import RLConfig
    from vl_rl.trainer import RLTrainer
    from vl_train.data.synthetic import verify

    train = _samples("train", spec.train_size, spec, seed + 7)
    heldout = _samples("heldout", spec.eval_size, spec, seed + 11)
    before = _target_reward(model, processor, heldout, spec, progress)
    config = RLConfig(
        method=spec.method,
        group_size=spec.group_size,
        prompts_per_step=spec.prompts_per_step,
        lr=spec.lr,
        temperature=spec.temperature,
        max_new_tokens=spec.max_new_tokens,
        thinking=False,
        max_steps=spec.steps,
        eval_every=0,
        save_every=0,
        output_dir=str(output_dir),
        seed=seed,
        tensorboard=False,
        plot=False,
        progress=progress,
        **spec.extra,
    )
    trainer = RLTrainer(model, processor, config, train, verify)  # wrapped in a SafeReward inside
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    after = _target_reward(model, processor, heldout, spec, progress)
    rewards = record_rewards(result.records)
    return RLRun(seconds, rewards, [(0, before), (len(rewards), after)], before, after, Path(output_dir))
