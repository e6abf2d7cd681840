"""What keeps a run from losing work: the output-folder policy, config checks on resume, stop signals.

- :func:`claim_output_dir`: a folder that already holds a run (checkpoints, ``metrics.jsonl``) is never
  written over by a fresh start: resume it, or ask for ``overwrite`` (which deletes that run's files);
  the temporary folders of killed checkpoint writes are removed.
- :func:`config_changes`: the settings a resumed run would silently change (anything but
  :data:`RESUMABLE` fields), so that resuming with them is an error that names them.
- :class:`StopSignals`: SIGINT / SIGTERM set a flag that the loop reads after each step (it then writes a
  checkpoint and stops); a second SIGINT interrupts at once.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from .checkpoint import list_checkpoints, remove_stale

__all__ = [
    "RESUMABLE",
    "RUN_FILES",
    "OutputDirError",
    "StopSignals",
    "claim_output_dir",
    "config_changes",
    "previous_run",
]

log = logging.getLogger(__name__)

RUN_FILES = ("metrics.jsonl", "tensorboard", "loss_curve.png", "reward_curve.png", "model")
"""Files and folders a run writes besides its checkpoints (``model``: the CLI's final model)."""

RESUMABLE = {"max_steps", "output_dir", "save_every", "keep_last", "tensorboard", "plot", "progress", "max_nan_steps"}
RESUMABLE |= {"checkpoint_format", "context_parallel", "expert_parallel"}  # how, not what: another world size
"""Settings a resumed run may change: how long it runs, what it writes and how it is split over ranks, not what
it computes."""


class OutputDirError(ValueError):
    """The output directory cannot be used: not writable, or it holds another run."""


def previous_run(folder: str | os.PathLike[str]) -> list[str]:
    """Names of what a previous run left in ``folder`` (checkpoints and run files); empty when none."""
    root = Path(folder)
    if not root.is_dir():
        return []
    found = [p.name for p in list_checkpoints(root)]
    found += [name for name in RUN_FILES[:-1] if (root / name).exists()]
    return found


def claim_output_dir(folder: str | os.PathLike[str], *, resume: bool, overwrite: bool) -> None:
    """Make ``folder`` this run's: refuse another run's files unless resuming or overwriting.

    Raises:
        OutputDirError: ``folder`` holds a previous run and neither ``resume`` nor ``overwrite`` is set
            (what was found is named).
    """
    root = Path(folder)
    remove_stale(root)
    found = previous_run(root)
    if not found or resume:
        return
    if not overwrite:
        shown = ", ".join(sorted(found)[:4]) + (", ..." if len(found) > 4 else "")
        raise OutputDirError(
            f"output folder {str(root)!r} already holds a run ({shown}): resume it (resume=True, vl-train --resume) "
            "or start over with overwrite=True (vl-train --overwrite, which deletes that run's checkpoints and "
            "metrics), or choose another output folder"
        )
    for path in list_checkpoints(root):
        shutil.rmtree(path)
    for name in RUN_FILES:
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    log.info("overwrite: removed the previous run's files in %s", root)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"name: old -> new"`` for every setting outside :data:`RESUMABLE` that differs (nested keys dotted)."""
    old, new = _flatten(saved), _flatten(current)
    changed = []
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in RESUMABLE:
            continue
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            changed.append(f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}")
    return changed


class StopSignals:
    """While active (a ``with`` block), SIGINT and SIGTERM ask the run to stop instead of killing it.

    ``requested`` holds the signal's name once one arrived. A second SIGINT raises ``KeyboardInterrupt``
    at once (the previous handlers are back). Outside the main thread this does nothing (Python delivers
    signals to the main thread only).
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.requested is not None and number == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt
        self.requested = name
        log.warning("%s received: finishing this step, writing a checkpoint and stopping", name)

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
