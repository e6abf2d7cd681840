"""Per-call time budget and the deterministic Hypothesis settings of the property tests.

Each test folder has its own copy (the packages' test suites run alone in the ``isolated`` nox
sessions, so one folder cannot import another's helpers).

``within_budget(fn, *args)`` calls ``fn`` and fails the test when that single call takes longer
than ``BUDGET_S``; a Python-level hang is interrupted (``SIGALRM``) after ``2 * BUDGET_S`` so that
CI fails instead of hanging. ``PROPERTY`` derandomises Hypothesis and keeps no example database,
so every run tries the same examples.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings

T = TypeVar("T")

BUDGET_S = 2.0
PROPERTY = settings(
    derandomize=True,
    database=None,
    deadline=None,  # the per-call budget below replaces Hypothesis's per-example deadline
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class BudgetExceeded(AssertionError):
    """A single call ran past its time budget."""


def within_budget(fn: Callable[..., T], *args: Any, budget_s: float = BUDGET_S, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, failing the test when the call takes longer than ``budget_s``."""
    on_main = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")

    def interrupt(signum: int, frame: Any) -> None:
        raise BudgetExceeded(f"{getattr(fn, '__name__', fn)} still running after {2 * budget_s} s")

    previous = signal.signal(signal.SIGALRM, interrupt) if on_main else None
    if on_main:
        signal.setitimer(signal.ITIMER_REAL, 2 * budget_s)
    start = time.perf_counter()
    try:
        value = fn(*args, **kwargs)
    finally:
        if on_main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    elapsed = time.perf_counter() - start
    if elapsed > budget_s:
        raise BudgetExceeded(f"{getattr(fn, '__name__', fn)} took {elapsed:.2f} s > {budget_s} s")
    return value


def finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value)
