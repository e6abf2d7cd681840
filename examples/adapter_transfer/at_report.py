"""The example's report: held-out accuracy per stage and task over seeds, gains against the seed spread.

Each stage's accuracy is given as the mean over the seeds +- the sample standard deviation (the
seed noise). A gain (stage against the baseline, or against the stage before it) is computed per
seed, on the same held-out samples, and called a **gain above the seed noise** when its mean exceeds
twice the standard deviation of the per-seed gains (a **loss** when it is below minus twice that),
with at least two seeds; otherwise it is within the seed noise.

Notation: ``S`` seeds, ``T`` tasks.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["Gain", "accuracy_table", "gain", "mean_std", "write_report"]

Scores = Mapping[str, float]
"""Task -> accuracy (0-1) of one evaluation."""


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value).

    Raises:
        ValueError: No values.
    """
    if not values:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _overall(scores: Scores) -> float:
    return math.fsum(scores.values()) / len(scores)


class Gain:
    """The per-seed gain of one stage over another on the mean accuracy over tasks.

    Args:
        label: What is compared (``"after E over the baseline"``).
        after: One evaluation per seed.
        before: One evaluation per seed, the same seeds in the same order.

    Raises:
        ValueError: Different numbers of seeds, or no seed.
    """

    def __init__(self, label: str, after: Sequence[Scores], before: Sequence[Scores]) -> None:
        if len(after) != len(before) or not after:
            raise ValueError(f"{label}: {len(after)} seeds after but {len(before)} before")
        self.label = label
        self.per_seed = [_overall(a) - _overall(b) for a, b in zip(after, before, strict=True)]
        self.mean, self.std = mean_std(self.per_seed)

    @property
    def above_noise(self) -> bool | None:
        """``mean > 2 std`` over at least two seeds (``None`` with one seed: no spread to compare with)."""
        return None if len(self.per_seed) < 2 else self.mean > 2 * self.std

    @property
    def verdict(self) -> str:
        """``"gain above the seed noise"``, ``"loss above the seed noise"`` (``mean < -2 std``), ``"within the
        seed noise"``, or ``"one seed: no spread"``."""
        if len(self.per_seed) < 2:
            return "one seed: no spread"
        if self.mean > 2 * self.std:
            return "gain above the seed noise"
        if self.mean < -2 * self.std:
            return "loss above the seed noise"
        return "within the seed noise"

    def line(self) -> str:
        """One report line: the mean gain in points, its seed spread and the verdict."""
        seeds = ", ".join(f"{100 * g:+.1f}" for g in self.per_seed)
        return (
            f"- {self.label}: {100 * self.mean:+.1f} ± {100 * self.std:.1f} points over {len(self.per_seed)} "
            f"seeds ({seeds}): {self.verdict}"
        )


def gain(label: str, after: Sequence[Scores], before: Sequence[Scores]) -> Gain:
    """:class:`Gain` of ``after`` over ``before`` (see there)."""
    return Gain(label, after, before)


def _cell(values: Sequence[float]) -> str:
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.1f}" if len(values) < 2 else f"{mean:.1f} ± {std:.1f}"


def accuracy_table(rows: Sequence[tuple[str, Sequence[Scores]]], tasks: Sequence[str]) -> str:
    """A markdown table: one row per stage (its evaluations, one per seed), one column per task and the mean.

    Raises:
        ValueError: A row without evaluations, or an evaluation missing a task (both named).
    """
    lines = [
        "| stage | " + " | ".join(tasks) + " | mean |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for label, runs in rows:
        if not runs:
            raise ValueError(f"row {label!r} has no evaluation")
        for run in runs:
            missing = [t for t in tasks if t not in run]
            if missing:
                raise ValueError(f"row {label!r} has no score for tasks {missing}")
        cells = [_cell([run[t] for run in runs]) for t in tasks]
        cells.append(_cell([math.fsum(run[t] for t in tasks) / len(tasks) for run in runs]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    path: Path,
    *,
    title: str,
    intro: str,
    table: str,
    gains: Sequence[Gain],
    times: Mapping[str, float],
    notes: Sequence[str],
) -> Path:
    """Write ``report.md``: the intro, the accuracy table, the gains, wall times and notes."""
    parts = [f"# {title}", "", intro, "", table, "", "## Gains (mean accuracy over the tasks)", ""]
    parts += [g.line() for g in gains]
    parts += ["", "## Wall time", "", "| part | seconds |", "|---|---:|"]
    parts += [f"| {name} | {seconds:.0f} |" for name, seconds in times.items()]
    parts += ["", "## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
