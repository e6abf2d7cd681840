"""The demo's RL stage: SAPO on the image-comparison prompts, reward = the synthetic verifier, run as a user would.

RL needs room to improve: after S1 the counting and colour answers are nearly always right (about
96 % and 100 % greedy), so RL there can only show noise. Comparing two images ("which contains more
blue shapes?") is learned only part way by the supervised stages, so the default ``RLSpec.tasks`` is
``("compare",)``; any synthetic image task can be chosen instead.

The stage takes the path a user's RL run takes: the prompts are written as user-format JSONL
(``prompts/train.jsonl``, images as PNG files beside it; the held-out prompts as ``prompts/heldout.jsonl``),
the starting model is saved as a checkpoint folder (``start/``), and every run is a recipe
(:func:`rl_recipe`: ``[model] init_from``, ``[data] kind = "jsonl"``, ``[reward] verifier = "synthetic"``,
``[rl]``, ``[optim]``) given to the ``vl-rl`` command line's :func:`vl_rl.cli.run_recipe`, which loads the
model with its processor, checks every prompt, trains with ``vl_rl.trainer.RLTrainer`` and saves the result.

To tell an RL gain from noise, the stage is run once per seed in ``RLSpec.seeds``, each time from the
same starting checkpoint. For every seed it measures the held-out **sampled reward**: the mean verifier
score of ``eval_samples_per_prompt`` responses per held-out prompt at the rollout temperature, which is
the quantity RL maximises. Greedy held-out accuracy is measured too. The model leaves the stage with
the weights of the first seed's run.

The stage is skipped, with a message, when ``vl_rl.trainer`` cannot be imported.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from demo_eval import evaluate_samples

__all__ = [
    "RLRun",
    "RLSpec",
    "SeedRun",
    "record_rewards",
    "rl_available",
    "rl_recipe",
    "run_rl",
    "standard_error_over_prompts",
    "write_prompts",
]

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
        eval_samples_per_prompt: Sampled responses per held-out prompt for the sampled reward.
        seeds: RL seeds, each run from the same starting weights (the first one's model is kept).
        train_size: Training prompts per task.
        image_size_range: Image sides of the prompts.
        grid: Cell side of the prompts' scenes (0: free placement).
        trainable: Parts RL trains (``RLConfig.trainable``): the LLM only, the vision side stays as V0 left it.
        extra: More ``RLConfig`` fields.
    """

    method: str = "sapo"
    tasks: tuple[str, ...] = ("compare",)
    steps: int = 40
    prompts_per_step: int = 32
    group_size: int = 8
    lr: float = 5e-5
    temperature: float = 1.0
    max_new_tokens: int = 8
    eval_size: int = 100
    eval_samples_per_prompt: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)
    train_size: int = 2000
    image_size_range: tuple[int, int] = (96, 128)
    grid: int = 0
    trainable: tuple[str, ...] = ("llm",)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SeedRun:
    """One RL run from the stage's starting weights.

    Attributes:
        seed: The RL seed.
        sampled_after: Held-out sampled reward after RL.
        greedy_after: Held-out greedy accuracy after RL.
        seconds: Wall time of the training.
    """

    seed: int
    sampled_after: float
    greedy_after: float
    seconds: float


@dataclass
class RLRun:
    """What the RL stage produced.

    Attributes:
        seconds: Wall time of the training, summed over the seeds.
        rewards: Mean training reward per step (first seed).
        evals: ``(step, held-out greedy accuracy)`` points of the kept model.
        before: Held-out greedy accuracy of the target tasks before RL.
        after: Held-out greedy accuracy after RL (first seed, the kept model).
        sampled_before: Held-out sampled reward before RL.
        sampled_se: Standard error over prompts of ``sampled_before`` (the evaluation's own noise).
        seed_runs: One entry per seed.
        output_dir: The stage's folder.
    """

    seconds: float
    rewards: list[float]
    evals: list[tuple[int, float]]
    before: float
    after: float
    sampled_before: float
    sampled_se: float
    seed_runs: list[SeedRun]
    output_dir: Path

    @property
    def gains(self) -> list[float]:
        """Sampled-reward gain of every seed."""
        return [r.sampled_after - self.sampled_before for r in self.seed_runs]

    @property
    def gain_mean(self) -> float:
        """Mean sampled-reward gain over the seeds."""
        return math.fsum(self.gains) / len(self.gains)

    @property
    def gain_std(self) -> float:
        """Sample standard deviation of the gain over the seeds (0 for one seed): the seed noise."""
        gains = self.gains
        if len(gains) < 2:
            return 0.0
        mean = self.gain_mean
        return math.sqrt(math.fsum((g - mean) ** 2 for g in gains) / (len(gains) - 1))

    def summary(self, method: str, tasks: Sequence[str], eval_size: int, samples_per_prompt: int) -> str:
        """One report line: sampled reward before/after per seed, the gain against the seed noise, greedy."""
        afters = ", ".join(f"{r.sampled_after:.3f} (seed {r.seed})" for r in self.seed_runs)
        beats = self.gain_mean > 2 * self.gain_std if len(self.seed_runs) > 1 else None
        verdict = (
            ""
            if beats is None
            else (" (more than twice the seed noise)" if beats else " (NOT above twice the seed noise)")
        )
        return (
            f"RL ({method}) on {', '.join(tasks)}, {eval_size} held-out prompts per task: sampled reward "
            f"({samples_per_prompt} responses per prompt at the rollout temperature) {self.sampled_before:.3f} -> "
            f"{afters}; gain {self.gain_mean:+.3f} +- {self.gain_std:.3f} over {len(self.seed_runs)} seeds{verdict}; "
            f"standard error of one such estimate over prompts {self.sampled_se:.3f}. "
            f"Greedy accuracy {self.before:.3f} -> {self.after:.3f} (kept model, seed {self.seed_runs[0].seed})."
        )


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
        grid=spec.grid,
    )
    return list(ds)


def _target_reward(model: Any, processor: Any, samples: list[dict[str, Any]], spec: RLSpec, progress: bool) -> float:
    return evaluate_samples(
        model, processor, samples, max_new_tokens=spec.max_new_tokens, progress=progress, desc="eval RL tasks"
    ).mean


def _sampled_reward(model: Any, processor: Any, samples: list[dict[str, Any]], spec: RLSpec) -> tuple[float, float]:
    """Mean sampled reward and its standard error over prompts (each prompt's mean counts once)."""
    from vl_rl.evaluate import evaluate
    from vl_train.data.synthetic import verify

    k = spec.eval_samples_per_prompt
    result = evaluate(
        model,
        processor,
        samples,
        verify,
        max_new_tokens=spec.max_new_tokens,
        thinking=False,
        greedy=False,
        samples_per_prompt=k,
        temperature=spec.temperature,
        seed=0,  # the same sampling stream before and after, for every RL seed
    )
    return result.mean, standard_error_over_prompts(result.rewards, k)


def standard_error_over_prompts(rewards: Sequence[float], per_prompt: int) -> float:
    """Standard error of the mean reward when ``rewards`` hold ``per_prompt`` consecutive responses per prompt.

    The responses to one prompt are correlated, so each prompt's mean counts once: the sample standard
    deviation of the per-prompt means over the square root of the number of prompts (0 for one prompt).

    Raises:
        ValueError: ``per_prompt < 1`` or a reward count that is not a multiple of it.
    """
    if per_prompt < 1 or not rewards or len(rewards) % per_prompt:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {per_prompt} responses per prompt")
    means = [math.fsum(rewards[i : i + per_prompt]) / per_prompt for i in range(0, len(rewards), per_prompt)]
    n = len(means)
    if n < 2:
        return 0.0
    mean = math.fsum(means) / n
    return math.sqrt(math.fsum((x - mean) ** 2 for x in means) / (n - 1) / n)


def write_prompts(spec: RLSpec, folder: Path, seed: int) -> tuple[Path, Path]:
    """The training and held-out prompts as user-format JSONL (images as PNG files); returns both paths."""
    from vl_train.data.format import write_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    train = write_jsonl(_samples("train", spec.train_size, spec, seed + 7), folder / "train.jsonl")
    heldout = write_jsonl(_samples("heldout", spec.eval_size, spec, seed + 11), folder / "heldout.jsonl")
    return train, heldout


def rl_recipe(spec: RLSpec, start: Path, prompts: Path, output_dir: Path, seed: int, progress: bool) -> dict[str, Any]:
    """The ``vl-rl`` recipe of one seed's run (what ``vl-rl RECIPE.toml`` would read from a file).

    The learning rate decays to 10 % over the run (``min_lr_ratio = 0.1``), the schedule of the measured
    runs in the README; the held-out evaluation is the stage's own (sampled and greedy), so none in the run.
    """
    rl = {
        "method": spec.method,
        "group_size": spec.group_size,
        "prompts_per_step": spec.prompts_per_step,
        "temperature": spec.temperature,
        "max_new_tokens": spec.max_new_tokens,
        "thinking": False,
        "max_steps": spec.steps,
        "trainable": list(spec.trainable),
        "eval_every": 0,
        "save_every": 0,
        "output_dir": str(output_dir),
        "seed": seed,
        "tensorboard": False,
        "plot": False,
        "progress": progress,
        **spec.extra,
    }
    return {
        "description": f"demo RL stage ({spec.method} on {', '.join(spec.tasks)})",
        "model": {"init_from": str(start)},
        "data": {"kind": "jsonl", "path": str(prompts), "policy": "fail"},
        "optim": {"lr": spec.lr, "min_lr_ratio": 0.1},
        "rl": rl,
        "reward": {"verifier": "synthetic"},
    }


def _load_heldout(path: Path) -> list[dict[str, Any]]:
    from vl_train.data.format import JsonlDataset

    return list(JsonlDataset(path))


def run_rl(
    model: Any, processor: Any, spec: RLSpec, output_dir: Path, *, seed: int = 0, progress: bool = True
) -> RLRun:
    """Train ``model`` in place with RL once per ``spec.seeds`` entry (each from the same start), as recipes.

    ``model`` ends with the weights of the first seed's run; ``seed`` offsets the prompt sets and RL seeds.
    Writes ``prompts/`` (the JSONL), ``start/`` (the starting checkpoint), ``seed<k>/`` (each run, with its
    ``recipe.toml`` and final ``model/``) into ``output_dir``.

    Raises:
        ImportError: ``vl_rl.trainer`` is not importable (check :func:`rl_available` first).
        ValueError: ``spec.seeds`` is empty.
    """
    from vl_rl.cli import run_recipe
    from vl_train.builders import save_model

    if not spec.seeds:
        raise ValueError("RLSpec.seeds must name at least one seed")
    output_dir = Path(output_dir)
    prompts, heldout_path = write_prompts(spec, output_dir / "prompts", seed)
    heldout = _load_heldout(heldout_path)
    before = _target_reward(model, processor, heldout, spec, progress)
    sampled_before, sampled_se = _sampled_reward(model, processor, heldout, spec)
    start = save_model(model, processor, output_dir / "start")
    kept: dict[str, Any] | None = None
    runs: list[SeedRun] = []
    rewards: list[float] = []
    after = before
    for k, rl_seed in enumerate(spec.seeds):
        folder = output_dir / f"seed{rl_seed}"
        recipe = rl_recipe(spec, start, prompts, folder, seed + rl_seed, progress)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "recipe.toml").write_text(_toml(recipe), encoding="utf-8")
        t0 = time.perf_counter()
        run = run_recipe(recipe, overwrite=True, log=_printer(progress))
        seconds = time.perf_counter() - t0
        trained = run.model.eval()
        greedy_after = _target_reward(trained, run.processor, heldout, spec, progress)
        sampled_after = _sampled_reward(trained, run.processor, heldout, spec)[0]
        runs.append(SeedRun(rl_seed, sampled_after, greedy_after, seconds))
        if k == 0:
            rewards, after = record_rewards(run.result.records), greedy_after
            kept = {key: v.detach().clone() for key, v in trained.state_dict().items()}
    assert kept is not None
    model.load_state_dict(kept)
    model.eval()
    return RLRun(
        seconds=math.fsum(r.seconds for r in runs),
        rewards=rewards,
        evals=[(0, before), (len(rewards), after)],
        before=before,
        after=after,
        sampled_before=sampled_before,
        sampled_se=sampled_se,
        seed_runs=runs,
        output_dir=Path(output_dir),
    )


def _printer(progress: bool) -> Callable[[str], None]:
    def log(line: str) -> None:
        if progress:
            print(f"demo: {line}")

    return log


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(value)


def _toml(recipe: dict[str, Any]) -> str:
    """A recipe dict as the TOML file a user would write (``vl-rl seed0/recipe.toml`` runs it again)."""
    lines = [f"{k} = {_value(v)}" for k, v in recipe.items() if not isinstance(v, dict)]
    for section, table in recipe.items():
        if isinstance(table, dict):
            lines += [f"\n[{section}]", *(f"{k} = {_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"
