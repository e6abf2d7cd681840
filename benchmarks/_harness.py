"""Side-by-side timing shared by every benchmark script.

Each ``benchmarks/bench_*.py`` defines ``run(quick: bool) -> list[Row]``. The
runner (``benchmarks/run_all.py``, called by ``nox -s bench``) collects the rows
of every script in one process and writes ``benchmarks/RESULTS.md``. A row
always compares ours against a named baseline measured in the same run, so the
ratio, not an absolute time, is the result.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Row:
    """One side-by-side measurement: ``speedup = baseline_ms / ours_ms``."""

    benchmark: str
    case: str
    baseline: str
    baseline_ms: float
    ours_ms: float
    device: str
    note: str = ""

    @property
    def speedup(self) -> float:
        return self.baseline_ms / self.ours_ms


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 2, repeat: int = 7) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def compare(
    benchmark: str,
    case: str,
    *,
    baseline: str,
    baseline_fn: Callable[[], object],
    ours_fn: Callable[[], object],
    device: str = "cpu",
    warmup: int = 2,
    repeat: int = 7,
    note: str = "",
) -> Row:
    """Time baseline and ours alternately (interleaved rounds reduce drift bias) and return a Row."""
    for _ in range(warmup):
        baseline_fn()
        ours_fn()
    _sync(device)
    base: list[float] = []
    ours: list[float] = []
    for _ in range(repeat):
        for fn, bucket in ((baseline_fn, base), (ours_fn, ours)):
            start = time.perf_counter()
            fn()
            _sync(device)
            bucket.append((time.perf_counter() - start) * 1e3)
    return Row(benchmark, case, baseline, statistics.median(base), statistics.median(ours), device, note)
