"""The demo's report: accuracy table per stage, wall times, Q/A examples and the PNG plots.

``report.md`` holds one row per evaluation point (``before`` training, then after each stage) and one
column per task plus the mean, with a final ``chance`` row (a uniform guess among the valid answers);
scores are percentages of the verifier's reward. The loss plot puts every stage on one step axis with
the stage boundaries marked; the reward plot shows the RL stage's mean reward per step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["QA", "accuracy_table", "plot_rewards", "plot_stage_losses", "write_report"]


@dataclass
class QA:
    """One example question about a fresh image or video, with the reloaded model's answer.

    Attributes:
        kind: ``"image"`` or ``"video"``.
        question: The question text.
        answer: The model's answer.
        expected: The true answer.
        correct: The verifier's score.
        media: The image (or first frame) saved next to the report, relative to it.
    """

    kind: str
    question: str
    answer: str
    expected: str
    correct: float
    media: str = ""


def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def accuracy_table(
    rows: Sequence[tuple[str, Mapping[str, float]]], chance: Mapping[str, float], *, tasks: Sequence[str] | None = None
) -> str:
    """A Markdown table: one row per ``(stage, per-task score)``, a column per task, then mean and chance.

    Args:
        rows: ``(label, {task: score in [0, 1]})`` in order.
        chance: ``{task: chance score}`` for the last row.
        tasks: Column order (default: every task seen, sorted).

    Raises:
        ValueError: No rows.
    """
    if not rows:
        raise ValueError("accuracy_table needs at least one row")
    names = list(tasks) if tasks is not None else sorted({t for _, scores in rows for t in scores})
    lines = [
        "| stage | " + " | ".join(names) + " | mean |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for label, scores in rows:
        present = [scores[t] for t in names if t in scores]
        mean = math.fsum(present) / len(present) if present else None
        lines.append(f"| {label} | " + " | ".join(_pct(scores.get(t)) for t in names) + f" | {_pct(mean)} |")
    chance_values = [chance.get(t, 0.0) for t in names]
    chance_mean = math.fsum(chance_values) / len(chance_values) if chance_values else 0.0
    lines.append("| chance | " + " | ".join(_pct(v) for v in chance_values) + f" | {_pct(chance_mean)} |")
    return "\n".join(lines)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stage_losses(losses: Mapping[str, Sequence[float]], path: str | os.PathLike[str]) -> Path:
    """One figure of the training loss of every stage on a shared step axis, stage boundaries dashed.

    Raises:
        ValueError: No stage has a finite loss.
    """
    if not any(math.isfinite(v) for values in losses.values() for v in values):
        raise ValueError("plot_stage_losses needs at least one finite loss")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for name, values in losses.items():
        points = [(offset + i + 1, v) for i, v in enumerate(values) if math.isfinite(v)]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name, linewidth=1)
        offset += len(values)
        ax.axvline(offset + 0.5, color="grey", linestyle="--", linewidth=0.6)
    ax.set_xlabel("optimiser step (all stages)")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_rewards(
    rewards: Sequence[float], path: str | os.PathLike[str], *, evals: Sequence[tuple[int, float]] = ()
) -> Path:
    """The RL stage's mean training reward per step (and held-out reward at ``(step, value)`` points).

    Raises:
        ValueError: No rewards.
    """
    if not rewards:
        raise ValueError("plot_rewards needs at least one reward")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = list(range(1, len(rewards) + 1))
    ax.plot(steps, list(rewards), label="train reward (mean of the group)", linewidth=1, alpha=0.6)
    window = max(1, len(rewards) // 10)
    smooth = [
        math.fsum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
        for i in range(len(rewards))
    ]
    ax.plot(steps, smooth, label=f"moving mean ({window} steps)", linewidth=2)
    if evals:
        ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="held-out reward")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_report(
    path: str | os.PathLike[str],
    *,
    title: str,
    table: str,
    times: Mapping[str, float],
    qa: Sequence[QA],
    figures: Mapping[str, str],
    notes: Sequence[str] = (),
) -> Path:
    """Write ``report.md``: the accuracy table, wall time per stage, the Q/A examples and figure links."""
    total = math.fsum(times.values())
    lines = [f"# {title}", "", "## Held-out accuracy per task (%)", "", table, ""]
    lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in times.items()]
    lines += [f"| total | {total:.1f} |", ""]
    if qa:
        lines += ["## Example questions (reloaded Hugging Face model)", ""]
        for item in qa:
            mark = "right" if item.correct >= 1.0 else ("partly right" if item.correct > 0 else "wrong")
            if item.correct >= 1.0 and item.answer != item.expected:
                mark = "right within the verifier's tolerance"  # e.g. timestamps may be 0.5 s off
            media = f"![{item.kind}]({item.media}) " if item.media else ""
            lines += [
                f"- {media}**Q ({item.kind}):** {item.question}",
                f"  **A:** `{item.answer}` (expected `{item.expected}`: {mark})",
            ]
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        lines += [f"- [{label}]({target})" for label, target in figures.items()]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    out = Path(path)
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
