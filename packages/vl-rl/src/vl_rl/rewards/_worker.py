"""A persistent worker process that runs reward calls and is killed when one runs past its timeout.

A thread cannot stop CPU-bound Python work (sympy holds the GIL; a thread timeout just abandons it),
a process can be killed. Starting a process per call would cost milliseconds (fork) to seconds
(spawn, which imports torch again), so one worker serves every call of its
:class:`~vl_rl.rewards.compose.SafeReward`: the call's arguments go through a pipe, the result (and the
zero-reward reasons collected, see ``_reasons``) come back. A call that runs past its timeout gets the
worker killed (``SIGKILL``); the next call starts a new one. A worker that died (crash, out-of-memory
kill) is restarted the same way and the call in flight is reported as failed.

Start method: ``"fork"`` (default on Linux) hands the reward function to the worker without
pickling, so closures and lambdas work; the worker then holds a copy of the parent's memory as of the
start (copy-on-write) and must not use CUDA if the parent initialised it. ``"spawn"`` /
``"forkserver"`` start a clean interpreter and need a picklable (module-level) function; an
unpicklable one is refused when the runner is built, with the reason. Inside a worker (or any
daemonic process, e.g. a data-loader worker) a ``SafeReward`` runs its calls in threads, because
daemonic processes may not have children; the enclosing process's time limit still bounds them.

State a reward keeps (caches, counters) lives in the worker: the parent's copy does not change.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from vl_rl.rewards._reasons import collect_reasons
from vl_rl.rewards._timeout import RewardTimeoutError

__all__ = ["IN_WORKER", "ProcessRunner", "RewardWorkerError", "default_start_method", "may_start_processes"]

IN_WORKER = False
"""True inside a worker process (set by the worker loop)."""


class RewardWorkerError(RuntimeError):
    """The worker process died during a call, or the call's arguments or result could not cross the pipe."""


def may_start_processes() -> bool:
    """False inside a reward worker or any daemonic process (multiprocessing forbids them children)."""
    return not IN_WORKER and not multiprocessing.current_process().daemon


def default_start_method() -> str:
    """``"fork"`` on Linux (closures work, start in milliseconds), else ``"spawn"`` (fork is unsafe on macOS)."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a ``RewardWorkerError`` carrying its ``repr``."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RewardWorkerError(f"reward raised {exc!r} (not picklable, passed as text)")
    return exc


def _serve(fn: Callable[..., Any], conn: Connection) -> None:
    """Worker loop: receive argument tuples, send back ``(ok, value_or_exception, reasons)``."""
    global IN_WORKER
    IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us
    torch = sys.modules.get("torch")
    if torch is not None:  # a forked OpenMP pool is unusable (torch's DataLoader workers do the same)
        torch.set_num_threads(1)
    while True:
        try:
            args = conn.recv()
        except (EOFError, OSError):
            return
        with collect_reasons() as reasons:
            try:
                reply: tuple[bool, Any, list[str]] = (True, fn(*args), reasons)
            except BaseException as exc:  # sent to the parent, which decides
                reply = (False, _portable(exc), reasons)
        try:
            conn.send(reply)
        except Exception as exc:  # the value could not be pickled
            conn.send((False, RewardWorkerError(f"reward result cannot be sent back: {exc!r}"), list(reasons)))


def _stop(process: BaseProcess | None, conn: Connection | None) -> None:
    if conn is not None:
        conn.close()
    if process is not None and process.is_alive():
        process.kill()
        process.join(1.0)


class ProcessRunner:
    """Runs ``fn(*args)`` in a persistent worker process, killing it when a call exceeds its timeout.

    Args:
        fn: The function; any callable with ``"fork"``, a picklable one otherwise.
        start_method: ``"fork"``, ``"spawn"`` or ``"forkserver"``; None picks :func:`default_start_method`.
        name: How the function is called in error messages.

    Attributes:
        starts: Worker processes started so far (the first start plus every restart).

    Raises:
        ValueError: An unknown or unavailable start method.
        TypeError: ``fn`` cannot be pickled for a ``"spawn"`` / ``"forkserver"`` worker.
    """

    def __init__(self, fn: Callable[..., Any], *, start_method: str | None = None, name: str = "reward") -> None:
        method = start_method or default_start_method()
        if method not in multiprocessing.get_all_start_methods():
            raise ValueError(
                f"start_method {method!r} is not available here; choose from {multiprocessing.get_all_start_methods()}"
            )
        if method != "fork":
            try:
                pickle.dumps(fn)
            except Exception as exc:
                raise TypeError(
                    f"reward {name!r} cannot be sent to a {method!r} worker process because it cannot be pickled "
                    f"({exc!r}); define it at module level, use start_method='fork' (Linux) or isolation='thread'"
                ) from None
        self.fn, self.name, self.start_method = fn, name, method
        self.starts = 0
        self._context: Any = multiprocessing.get_context(method)
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize[Any, ProcessRunner] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """A copy (pickle, deepcopy) gets no process: it starts its own on its first call."""
        return {"fn": self.fn, "name": self.name, "start_method": self.start_method}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["fn"], start_method=state["start_method"], name=state["name"])  # type: ignore[misc]

    def _start(self) -> Connection:
        self.close()
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_serve, args=(self.fn, child), name=f"vl-rl-reward-{self.name}", daemon=True
        )
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork() in a multi-threaded process (torch's pools, tokenizers):
            # the child only runs the reward, with torch's thread pool reset to one thread.
            warnings.filterwarnings(
                "ignore", message=".*use of fork\\(\\) may lead to deadlocks", category=DeprecationWarning
            )
            process.start()
        child.close()
        self._process, self._conn = process, parent
        self._finalizer = weakref.finalize(self, _stop, process, parent)
        self.starts += 1
        return parent

    def close(self) -> None:
        """Stop the worker (a later call starts a new one)."""
        if self._finalizer is not None:
            self._finalizer()  # kills the process and closes the pipe, once
        self._process = self._conn = self._finalizer = None

    def call(self, args: tuple[Any, ...], timeout_s: float) -> tuple[Any, list[str]]:
        """``(fn(*args), reasons)`` computed in the worker.

        Raises:
            RewardTimeoutError: No result within ``timeout_s`` seconds (the worker was killed).
            RewardWorkerError: The worker died, or the arguments or result could not be pickled.
            Exception: Whatever ``fn`` raised in the worker.
        """
        with self._lock:
            conn = self._conn
            if conn is None or self._process is None or not self._process.is_alive():
                conn = self._start()
            try:
                conn.send(args)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                raise RewardWorkerError(f"reward arguments cannot be sent to the worker process: {exc!r}") from None
            except OSError as exc:  # the worker died since the last call
                self.close()
                raise RewardWorkerError(f"reward worker process was gone: {exc!r}") from None
            if not conn.poll(timeout_s):
                self.close()
                raise RewardTimeoutError(f"reward call exceeded {timeout_s} s; its worker process was killed")
            try:
                ok, payload, reasons = conn.recv()
            except (EOFError, OSError):
                code = None
                if self._process is not None:
                    self._process.join(1.0)  # the pipe closed as it exited: reap it to read its exit code
                    code = self._process.exitcode
                self.close()
                raise RewardWorkerError(f"reward worker process died during the call (exit code {code})") from None
        if not ok:
            raise payload
        return payload, reasons
