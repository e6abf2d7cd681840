"""Run metrics: one JSON line per step, optional TensorBoard events, progress bar and loss-curve PNG.

Only the JSONL file is always written; TensorBoard (``torch.utils.tensorboard``, needs the
``tensorboard`` package), the progress bar (``tqdm``) and the plot (``matplotlib``) are used when
requested and importable, and skipped with a logged note otherwise.

A record is a flat dict, e.g. ``{"step": 3, "loss": 2.1, "lr/llm": 1e-5, "grad_norm": 0.8,
"tokens": 512, "tokens_per_s": 9e3, "skipped": false}``; numbers go to TensorBoard under their keys.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS_FILE",
    "PLOT_FILE",
    "MetricsLogger",
    "NonFiniteGuard",
    "RankMetrics",
    "plot_curves",
    "plot_loss_curve",
]

log = logging.getLogger(__name__)
METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR = "metrics.jsonl", "loss_curve.png", "tensorboard"


def _jsonable(value: Any) -> Any:
    # JSON has no NaN/inf: skipped steps log their loss as a string so the file stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def plot_curves(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike[str],
    *,
    ylabel: str,
    xlabel: str = "step",
    markers: Sequence[str] = (),
) -> Path | None:
    """Plot named ``(x, y)`` series (non-finite points left out) into a PNG; ``None`` without matplotlib.

    Args:
        series: Label -> points; empty series are not drawn.
        path: The PNG.
        ylabel: The y axis' label.
        xlabel: The x axis' label.
        markers: Labels drawn with a dot at every point (sparse series such as evaluations).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no %s", Path(path).name)
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        finite = [(x, y) for x, y in points if math.isfinite(y)]
        if finite:
            dots = label in markers or len(finite) < 50
            ax.plot([p[0] for p in finite], [p[1] for p in finite], label=label, marker="." if dots else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_loss_curve(records: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path | None:
    """Plot ``loss`` (and ``eval_loss`` where present) against ``step``; ``None`` without matplotlib."""
    series = {
        key: [(r["step"], r[key]) for r in records if isinstance(r.get(key), float)] for key in ("loss", "eval_loss")
    }
    return plot_curves(series, path, ylabel="loss")


class MetricsLogger:
    """Writes step records to ``metrics.jsonl`` (+ TensorBoard) and drives an optional progress bar.

    Args:
        output_dir: The run's folder (must exist).
        total_steps: Steps of the run (for the progress bar).
        tensorboard: Also write TensorBoard events under ``output_dir/tensorboard``.
        progress: Show a tqdm bar when stderr is a terminal.
        history: Records of earlier steps (a resumed run): the JSONL file is rewritten with exactly
            these, dropping lines a killed run wrote after its last checkpoint.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        total_steps: int,
        tensorboard: bool = False,
        progress: bool = False,
        history: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.dir = Path(output_dir)
        self.records: list[dict[str, Any]] = [dict(r) for r in history]
        self.path = self.dir / METRICS_FILE
        with self.path.open("w") as f:
            f.writelines(json.dumps({k: _jsonable(v) for k, v in r.items()}) + "\n" for r in self.records)
        self._file = self.path.open("a")
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.dir / TENSORBOARD_DIR))
            except ImportError:
                log.info("tensorboard is not installed: metrics go to %s only", self.path)
        self._bar: Any = None
        if progress:
            try:
                from tqdm.auto import tqdm  # type: ignore[import-untyped, unused-ignore]

                # disable=None: no bar when stderr is not a terminal (logs, CI, nohup), as TrainConfig promises
                self._bar = tqdm(total=total_steps, initial=len(self.records), desc="train", unit="step", disable=None)
            except ImportError:
                log.info("tqdm is not installed: no progress bar")

    def log(self, record: dict[str, Any]) -> None:
        """Append one step's record (keys ``step`` and any numbers / bools / strings)."""
        self.records.append(dict(record))
        self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        step = int(record["step"])
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
        if self._bar is not None:
            self._bar.update(1)
            loss = record.get("loss")
            if isinstance(loss, float):
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self, plot: bool = False) -> Path | None:
        """Close the files and bar; with ``plot`` write the loss-curve PNG and return its path."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
        return plot_loss_curve(self.records, self.dir / PLOT_FILE) if plot and self.records else None


class RankMetrics:
    """The metrics of a rank other than 0: kept in memory (the same interface as :class:`MetricsLogger`), no files."""

    def __init__(self, history: Sequence[dict[str, Any]] = ()) -> None:
        self.records = [dict(r) for r in history]

    def log(self, record: dict[str, Any]) -> None:
        """Keep one step's record."""
        self.records.append(dict(record))

    def close(self, plot: bool = False) -> Path | None:
        """Nothing to close or plot; returns ``None``."""
        return None


class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) steps and says when the run must stop.

    Args:
        max_bad: Consecutive skipped steps that stop the run.
    """

    def __init__(self, max_bad: int) -> None:
        self.max_bad, self.run = max_bad, 0

    def update(self, step: int, record: dict[str, Any]) -> str | None:
        """Record a step; returns the stop message once ``max_bad`` steps in a row were skipped, else ``None``."""
        if not record.get("skipped"):
            self.run = 0
            return None
        self.run += 1
        log.warning("step %d: non-finite loss %s, step skipped (weights unchanged)", step, record.get("loss"))
        if self.run < self.max_bad:
            return None
        reason = (
            f"non-finite loss in {self.run} consecutive steps (max_nan_steps={self.max_bad}), "
            f"last at step {step}: the run stopped; check the data and lower the learning rate"
        )
        log.error(reason)
        return reason
