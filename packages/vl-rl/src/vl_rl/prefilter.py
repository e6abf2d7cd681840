"""Offline pass-rate filtering of RL prompts with the starting policy (Qwen3-VL's reasoning RL data).

Qwen3-VL (REFERENCE.md section 5) samples 16 rollouts per query with the model RL starts from and drops
the queries solved more than 90 % of the time and the ones never solved: neither gives a group-relative
learning signal. :func:`prefilter_prompts` does that with any rollout engine and reward (pass: reward
``>= pass_threshold``), :func:`~vl_rl.curriculum.pass_rate_filter` deciding; :func:`write_prefilter_report`
writes what it found:

- ``kept.jsonl``: the kept prompts in the sample format (media written beside it or referenced), reusable as
  the ``[data] path`` of a later run;
- ``pass_rates.jsonl``: one line per prompt: ``id``, ``task``, ``source`` (``file:line``), ``pass_rate``, ``kept``;
- ``summary.json``: the counts (``total``, ``kept``, ``too_easy``, ``all_wrong``, ``keep_fraction``) and settings.

With ``W`` ranks every rank scores an equal share (the last padded) and the rewards are gathered, so every
rank ends with the same result and makes the same number of generate calls.

Notation: ``N`` prompts, ``k`` rollouts per prompt, ``W`` ranks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._dist import distributed
from .curriculum import pass_rate_filter, pass_rates_from_rewards
from .evaluate import prompt_of
from .rewards import SafeReward
from .rollout import RolloutEngine

__all__ = ["PrefilterResult", "prefilter_prompts", "write_prefilter_report"]


@dataclass
class PrefilterResult:
    """What the pass-rate filter found.

    Attributes:
        kept: Positions of the kept prompts in the list given, ascending.
        pass_rates: Pass rate of every prompt, in order.
        stats: ``total``, ``kept``, ``too_easy``, ``all_wrong`` (counts) and ``keep_fraction``.
        settings: ``rollouts``, ``high``, ``drop_all_wrong``, ``pass_threshold``.
    """

    kept: list[int]
    pass_rates: list[float]
    stats: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (a checkpoint keeps them, so a resumed run trains on the same prompts)."""
        return {"kept": self.kept, "pass_rates": self.pass_rates, "stats": self.stats, "settings": self.settings}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrefilterResult:
        """Inverse of :meth:`to_dict`."""
        return cls(list(data["kept"]), list(data["pass_rates"]), dict(data["stats"]), dict(data["settings"]))


def _my_share(samples: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int, int]:
    """``(this rank's prompts padded to an equal share, share, how many are real)``."""
    world = torch.distributed.get_world_size() if distributed() else 1
    rank = torch.distributed.get_rank() if distributed() else 0
    share = -(-len(samples) // world)
    mine = list(samples[rank * share : (rank + 1) * share])
    return mine + [samples[0]] * (share - len(mine)), share, len(mine)


def prefilter_prompts(
    engine: RolloutEngine,
    reward: SafeReward,
    samples: Sequence[dict[str, Any]],
    *,
    rollouts: int,
    high: float = 0.9,
    drop_all_wrong: bool = True,
    pass_threshold: float = 1.0,
    prompts_per_call: int = 8,
) -> PrefilterResult:
    """Score every prompt with ``rollouts`` responses and keep the learnable ones (module docstring).

    Args:
        engine: Samples the responses (the policy RL starts from).
        reward: ``reward(prompt, response, sample)``; failures score 0 and are counted by the SafeReward.
        samples: The prompts.
        rollouts: ``k`` responses per prompt (>= 2).
        high: Drop prompts whose pass rate is above this.
        drop_all_wrong: Drop prompts no response solved.
        pass_threshold: A response passes when its reward is at least this.
        prompts_per_call: Prompts per ``engine.generate`` call.

    Raises:
        ValueError: No prompts or ``rollouts < 2``.
    """
    if not samples or rollouts < 2:
        raise ValueError(f"the pass-rate filter needs prompts and >= 2 rollouts each, got {len(samples)}, {rollouts}")
    padded, share, real = _my_share(samples)
    rows: list[list[float]] = []
    for start in range(0, share, prompts_per_call):
        chunk = padded[start : start + prompts_per_call]
        rollout = engine.generate(chunk, rollouts)
        values = [reward(prompt_of(s), t, s) for s, t in zip(rollout.row_samples, rollout.texts, strict=True)]
        rows += [values[i * rollouts : (i + 1) * rollouts] for i in range(len(chunk))]
    mine = rows[:real]
    if distributed():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
        mine = [row for part in gathered for row in part]
    rewards = torch.tensor(mine, dtype=torch.float64)
    rates = pass_rates_from_rewards(rewards, pass_threshold)
    keep = pass_rate_filter(rates, high=high, drop_all_wrong=drop_all_wrong)
    stats = {
        "total": float(len(samples)),
        "kept": float(int(keep.sum())),
        "too_easy": float(int((rates > high).sum())),
        "all_wrong": float(int((rates == 0).sum())),
        "keep_fraction": float(keep.double().mean()),
    }
    settings = {"rollouts": rollouts, "high": high, "drop_all_wrong": drop_all_wrong, "pass_threshold": pass_threshold}
    return PrefilterResult(keep.nonzero().flatten().tolist(), rates.tolist(), stats, settings)


def write_prefilter_report(
    folder: str | Path, samples: Sequence[dict[str, Any]], result: PrefilterResult
) -> dict[str, Path]:
    """Write ``kept.jsonl``, ``pass_rates.jsonl`` and ``summary.json`` into ``folder`` (see the module docstring).

    Returns:
        ``{"kept": ..., "pass_rates": ..., "summary": ...}`` paths.
    """
    from vl_train.data.format import write_jsonl

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    kept = set(result.kept)
    lines = []
    for i, (sample, rate) in enumerate(zip(samples, result.pass_rates, strict=True)):
        row = {"id": sample.get("id"), "task": sample.get("task"), "source": sample.get("_source")}
        lines.append(json.dumps({**row, "pass_rate": rate, "kept": i in kept}))
    paths = {"kept": out / "kept.jsonl", "pass_rates": out / "pass_rates.jsonl", "summary": out / "summary.json"}
    write_jsonl([samples[i] for i in result.kept], paths["kept"])
    paths["pass_rates"].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    summary = {**result.stats, "settings": result.settings}
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return paths
