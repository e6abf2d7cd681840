"""Run a callable with a wall-clock timeout in a daemon thread (the judge's model calls, ``isolation="thread"``).

Python cannot kill a thread: a call that hangs past its timeout is abandoned, not stopped. The
thread is a daemon so it never blocks interpreter exit, but it keeps its CPU time and memory until
it returns on its own. That suits calls that wait (a judge model on a GPU, a remote API), not
CPU-bound Python work, which holds the GIL: :class:`~vl_rl.rewards.compose.SafeReward` runs rewards
in a worker process that is killed on timeout (``_worker``). Untrusted code (e.g. executing generated
programs) must run in a subprocess with time and memory limits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class RewardTimeoutError(TimeoutError):
    """A reward call ran longer than its timeout (its worker process was killed, or its thread abandoned)."""


def call_with_timeout(fn: Callable[..., T], args: tuple[Any, ...], timeout_s: float | None) -> T:
    """Calls ``fn(*args)``; with a timeout, in a daemon thread that is abandoned when it hangs.

    Args:
        fn: The callable.
        args: Positional arguments.
        timeout_s: Seconds to wait; ``None`` calls ``fn`` directly in this thread.

    Returns:
        What ``fn`` returned.

    Raises:
        RewardTimeoutError: ``fn`` did not return within ``timeout_s``.
        Exception: Whatever ``fn`` raised, re-raised in the caller's thread.
    """
    if timeout_s is None:
        return fn(*args)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller's thread below
            box["error"] = exc

    worker = threading.Thread(target=target, name="vl-rl-reward", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise RewardTimeoutError(f"reward call exceeded {timeout_s} s; its thread was abandoned")
    if "error" in box:
        raise box["error"]
    return box["value"]
