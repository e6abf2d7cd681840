"""The runs the composed-model tests compare: one process against 2 FSDP2 ranks, composed twin against core."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from _composed import composed_twin
from _trainer_fsdp_worker import ROWS, batches, config

from vl_train.trainer import Trainer, TrainResult


def train_run(out: Path, rank: int = 0, world: int = 1, *, core: bool = False) -> tuple[Any, TrainResult]:
    """3 supervised steps of 2 micro-batches; rank ``r`` of ``world`` takes its rows of each global micro-batch."""
    from _trainer_helpers import tiny_model

    model = tiny_model(0)
    if not core:
        model = composed_twin(model)
    per_rank = ROWS // world
    result = Trainer(model, config(out), batches(rank * per_rank, (rank + 1) * per_rank)).train()
    return model, result


def rl_setup(prompts: list[dict[str, Any]] | None = None) -> tuple[Any, Any, Any, list[dict[str, Any]]]:
    """``(core model, processor, rollout, samples)``: a fixed rollout of 2 prompts x 3 responses by the core model.

    ``prompts``: the 2 prompts (default: 2 synthetic samples with images).
    """
    from _rl_helpers import samples, tiny

    from vl_rl.rollout import HFRolloutEngine

    model, processor = tiny()
    prompts = samples(2) if prompts is None else prompts
    torch.manual_seed(0)
    rollout = HFRolloutEngine(model, processor, max_new_tokens=4, thinking=False).generate(prompts, 3)
    return model, processor, rollout, prompts


class FixedEngine:
    """Returns this rank's groups of one fixed rollout every time."""

    def __init__(self, rollout: Any) -> None:
        self.rollout = rollout

    def generate(self, samples: Any, group_size: int, *, greedy: bool = False) -> Any:
        return self.rollout


def length_reward(sample: dict[str, Any], response: str) -> float:
    """A reward with spread inside groups: the response's length."""
    return len(response) / 10


def rl_run(
    out: Path,
    rank: int = 0,
    world: int = 1,
    *,
    core: bool = False,
    prompts: list[dict[str, Any]] | None = None,
    prepare: Any = None,
) -> tuple[Any, Any]:
    """2 SAPO steps of 2 epochs on the fixed rollout; rank ``r`` of ``world`` updates on its prompts' groups.

    ``prompts``: those of :func:`rl_setup`; ``prepare(model, processor)``: called on the model before training.
    """
    from vl_rl.config import RLConfig
    from vl_rl.rollout import subset_groups
    from vl_rl.trainer import RLTrainer

    model, processor, rollout, prompts = rl_setup(prompts)
    if not core:
        model = composed_twin(model)
    if prepare is not None:
        prepare(model, processor)
    share = len(prompts) // world
    mine = subset_groups(rollout, list(range(rank * share, (rank + 1) * share))) if world > 1 else rollout
    cfg = RLConfig(
        group_size=3,
        prompts_per_step=2,
        mini_batches=1,
        epochs=2,
        max_new_tokens=4,
        thinking=False,
        max_steps=2,
        eval_every=0,
        optim={"lr": 1e-2},
        output_dir=str(out),
        progress=False,
        plot=False,
    )
    result = RLTrainer(model, processor, cfg, prompts, length_reward, engine=FixedEngine(mine)).train()
    return model, result
