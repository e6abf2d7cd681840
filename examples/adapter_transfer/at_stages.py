"""The recipe's training stages: supervised runs through ``vl_train.Trainer``, GRPO through ``vl_rl.RLTrainer``.

Every supervised run of the example (the two LLMs' text pretraining, stage A, the hybrid SFT C and
the filtered SFT D) is :func:`train_sft`: a ``MixtureSampler`` over per-task ``SyntheticDataset``
sources (or over a list of samples), rendered by ``SampleRenderer`` (thinking format on the samples
that carry ``reasoning``), optionally turned into the text view (``at_cells.TextView``), packed by
``PackedStream`` and trained by ``Trainer`` with only ``trainable`` parts unfrozen.

Filtered SFT (Skywork-R1V's iterative SFT): :func:`score_items` answers training items greedily and
scores them with the synthetic verifier; :func:`wrong_items` keeps exactly those scored below 1.

GRPO (:func:`run_grpo`): ``RLTrainer`` with ``method="grpo"`` on training prompts, reward = the verifier.

Notation: ``N`` prompts per RL step, ``G`` responses per prompt.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from at_cells import CellListing, TextView
from at_models import ModelSpec
from demo_eval import evaluate_samples
from demo_rl import record_rewards

from vl_model.parts import PARTS, unfreeze
from vl_train import OptimConfig, TrainConfig, Trainer
from vl_train.data import MixtureSampler, SampleRenderer, SyntheticDataset, verify
from vl_train.data.stream import PackedStream

__all__ = [
    "CELLS",
    "GRPOSpec",
    "SFTSpec",
    "StageRun",
    "run_grpo",
    "score_items",
    "synthetic_sources",
    "train_sft",
    "wrong_items",
]


CELLS = "cells"
"""Task name of the cell-listing alignment task (``at_cells.CellListing``)."""


@dataclass
class SFTSpec:
    """One supervised run.

    Attributes:
        name: Short name (also the output sub-folder).
        steps: Optimiser steps.
        lr: Peak learning rate (warm-up, then cosine to 10 %).
        trainable: Parts that train (``vl_model.PARTS``); the others stay frozen.
        thinking: Fraction of the synthetic samples that carry reasoning (rendered ``<think>...</think>``).
        text_view: Train on the text view (images as cell tokens, no pixels) instead of the images.
        warmup_steps: Linear warm-up steps.
        micro_batch_size: Packed rows per step.
        max_length: Tokens per packed row.
        tasks: Task -> sampling weight of this run (``None``: the recipe's mixture).
    """

    name: str
    steps: int
    lr: float
    trainable: tuple[str, ...]
    thinking: float = 0.0
    text_view: bool = False
    warmup_steps: int = 10
    micro_batch_size: int = 8
    max_length: int = 256
    tasks: dict[str, float] | None = None


@dataclass
class StageRun:
    """What one training run produced.

    Attributes:
        name: The run.
        seconds: Wall time of the training.
        losses: Loss (supervised) or mean reward (GRPO) per step.
    """

    name: str
    seconds: float
    losses: list[float]


def synthetic_sources(
    tasks: Mapping[str, float], spec: ModelSpec, *, size: int, seed: int, thinking: float
) -> tuple[dict[str, Any], dict[str, float]]:
    """``(sources, ratios)``: one training-split dataset per task, weighted by ``tasks``.

    Each is a ``SyntheticDataset`` of that task, except ``"cells"``: the ``at_cells.CellListing``
    alignment task on the images of counting scenes (1 to 8 shapes).
    """

    def dataset(task: str) -> Any:
        data = SyntheticDataset(
            "train",
            size=size,
            seed=seed,
            tasks=["count" if task == CELLS else task],
            image_size_range=spec.image_size_range,
            thinking=thinking,
            grid=spec.grid,
        )
        return CellListing(data, spec.grid) if task == CELLS else data

    return {task: dataset(task) for task in tasks}, {task: float(w) for task, w in tasks.items()}


def train_sft(
    model: Any,
    processor: Any,
    sources: Mapping[str, Sequence[dict[str, Any]]],
    ratios: Mapping[str, float],
    run: SFTSpec,
    grid: int,
    output_dir: Path,
    *,
    seed: int,
    progress: bool,
) -> StageRun:
    """Train ``model`` in place on ``sources`` mixed by ``ratios`` (see the module docstring).

    Every part is left unfrozen afterwards (the Trainer froze those outside ``run.trainable``).
    """
    config = TrainConfig(
        trainable=run.trainable,
        max_steps=run.steps,
        optim=OptimConfig(lr=run.lr, warmup_steps=min(run.warmup_steps, run.steps - 1), weight_decay=0.0),
        micro_batch_size=run.micro_batch_size,
        max_length=run.max_length,
        packing=True,
        seed=seed,
        output_dir=str(output_dir / run.name),
        save_every=0,
        keep_last=1,
        tensorboard=False,
        plot=False,
        progress=progress,
        bf16=False,
    )
    mixture = MixtureSampler(dict(sources), dict(ratios), seed=seed, shuffle_buffer=64)
    renderer: Any = SampleRenderer(processor, max_length=run.max_length, overlong="drop")
    if run.text_view:
        renderer = TextView(renderer, grid)
    batches = PackedStream(
        mixture,
        renderer,
        max_length=run.max_length,
        pad_token_id=int(processor.tokenizer.pad_token_id),
        rows_per_batch=run.micro_batch_size,
    )
    start = time.perf_counter()
    result = Trainer(model, config, batches).train()
    seconds = time.perf_counter() - start
    unfreeze(model, PARTS)
    model.eval()
    return StageRun(run.name, seconds, list(result.losses))


def score_items(model: Any, processor: Any, samples: Sequence[dict[str, Any]], *, max_new_tokens: int) -> list[float]:
    """The verifier's score of the model's greedy, non-thinking answer to every sample, in order."""
    return evaluate_samples(model, processor, samples, max_new_tokens=max_new_tokens, progress=False).scores


def wrong_items(samples: Sequence[dict[str, Any]], scores: Sequence[float]) -> list[dict[str, Any]]:
    """The samples scored below 1 (wrong or partly wrong), in order.

    Raises:
        ValueError: A different number of samples and scores.
    """
    if len(samples) != len(scores):
        raise ValueError(f"{len(samples)} samples but {len(scores)} scores")
    return [s for s, score in zip(samples, scores, strict=True) if score < 1.0]


@dataclass
class GRPOSpec:
    """Settings of the GRPO stage (``vl_rl.RLConfig`` fields).

    Attributes:
        steps: RL steps.
        prompts_per_step: ``N``.
        group_size: ``G``.
        lr: Learning rate (constant).
        max_new_tokens: Tokens per response.
        trainable: Parts RL trains.
        temperature: Sampling temperature of the rollouts.
    """

    steps: int = 30
    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 1e-4
    max_new_tokens: int = 8
    trainable: tuple[str, ...] = ("merger", "deepstack")
    temperature: float = 1.0


def run_grpo(
    model: Any,
    processor: Any,
    prompts: Sequence[dict[str, Any]],
    grpo: GRPOSpec,
    output_dir: Path,
    *,
    seed: int,
    progress: bool,
) -> StageRun:
    """GRPO on ``prompts`` with the synthetic verifier as reward; trains ``model`` in place."""
    from vl_rl.config import RLConfig
    from vl_rl.trainer import RLTrainer

    config = RLConfig(
        method="grpo",
        group_size=grpo.group_size,
        prompts_per_step=grpo.prompts_per_step,
        # cosine decay to 10 % (RLConfig's default is a constant rate): what the measured runs used
        optim=OptimConfig(lr=grpo.lr, min_lr_ratio=0.1),
        temperature=grpo.temperature,
        max_new_tokens=grpo.max_new_tokens,
        thinking=False,
        max_steps=grpo.steps,
        trainable=grpo.trainable,
        eval_every=0,
        save_every=0,
        keep_last=1,
        output_dir=str(output_dir / "E_grpo"),
        seed=seed,
        tensorboard=False,
        plot=False,
        progress=progress,
    )
    start = time.perf_counter()
    result = RLTrainer(model, processor, config, list(prompts), verify).train()
    seconds = time.perf_counter() - start
    unfreeze(model, PARTS)
    model.eval()
    return StageRun("E_grpo", seconds, record_rewards(result.records))
