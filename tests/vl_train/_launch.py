"""Launch a test worker script on ``N`` gloo ranks, as torchrun would, and fail with every rank's log;
:func:`serve_rank` is the worker side."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
"""Whether multi-process tests can run here (torch.distributed with the gloo backend)."""


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(worker: Path, *args: str, world: int = 2, timeout: float = 240.0, env: dict[str, str] | None = None) -> None:
    """Run ``python worker *args`` as ranks ``0 .. world - 1`` (``RANK``, ``WORLD_SIZE``, ``MASTER_*`` set).

    Raises:
        AssertionError: A rank exited non-zero or ran past ``timeout`` seconds (all logs in the message).
    """
    base = {**os.environ, **(env or {}), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1"}
    base.update(MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), *args],
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    logs = [""] * world
    try:
        for r, p in enumerate(procs):
            try:
                logs[r] = p.communicate(timeout=timeout)[0].decode()
            except subprocess.TimeoutExpired:
                logs[r] = f"rank {r} ran past {timeout} s"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    assert not failed, "\n".join(f"----- rank {r} (exit {procs[r].returncode})\n{logs[r]}" for r in range(world))


def serve_rank(out: str, work: Callable[[], dict[str, Any]]) -> None:
    """A worker rank's life: join the gloo group (one thread), ``work()``, rank 0 saves it as ``OUT/result.pt``.

    Leaves the group, then the process at once: gloo's threads can abort interpreter teardown after the work.
    """
    from vl_train.parallel import init_distributed, is_main_process

    torch.set_num_threads(1)
    assert init_distributed("gloo")
    result = work()
    if is_main_process():
        torch.save(result, Path(out) / "result.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
