"""Why a reward was zero: short reason codes that verifiers record and callers may collect.

A verifier that gives 0 for a reason worth counting (a number out of range, a hedged answer, too many
boxes) returns :func:`zero` with a short snake_case code instead of a bare ``0.0``. Inside
:func:`collect_reasons` the codes of every call are gathered in a list; outside, nothing is kept.
:class:`~vl_rl.rewards.compose.SafeReward` collects them per call (also from its worker process) and
reports their counts in ``metrics()``.

Collection uses a context variable, so concurrent calls in different threads keep separate lists.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["collect_reasons", "zero"]

_BAG: ContextVar[list[str] | None] = ContextVar("vl_rl_reward_reasons", default=None)


def zero(reason: str) -> float:
    """Record ``reason`` (when collecting) and return ``0.0``, the reward it explains."""
    bag = _BAG.get()
    if bag is not None:
        bag.append(reason)
    return 0.0


@contextmanager
def collect_reasons() -> Iterator[list[str]]:
    """Gather the reason codes of the reward calls made inside the ``with`` block.

    Example:
        >>> from vl_rl.rewards import collect_reasons, count_reward
        >>> with collect_reasons() as why:
        ...     count_reward("", r"\\boxed{1e999}", {"answer": 3})
        0.0
        >>> why
        ['number_out_of_range']
    """
    bag: list[str] = []
    token = _BAG.set(bag)
    try:
        yield bag
    finally:
        _BAG.reset(token)
