"""Atomic training checkpoints: model (safetensors), optimiser, scheduler, RNG, data state, step.

A checkpoint is a folder ``checkpoint-<step:08d>`` holding

- ``model.safetensors``: the model's state dict;
- ``trainer_state.pt``: optimiser and scheduler state dicts, the RNG states (Python, NumPy, torch CPU
  and CUDA) and the data iterator's state (``torch.save``; loaded with ``weights_only=True``);
- ``meta.json``: the step, the run's id, the metrics records so far and the size and SHA-256 of every
  other file; written last, so a folder with it is complete.

It is written into a temporary folder next to its final place, every file is fsynced, and the folder
is renamed into place (``os.replace``), so a run killed at any moment leaves either the previous
checkpoint or the new one, never a half-written one. :func:`latest_checkpoint` ignores leftovers;
:func:`latest_valid_checkpoint` also skips (with a warning) a checkpoint whose files no longer match
their checksums, falling back to the previous valid one; :func:`remove_stale` deletes the temporary
folders of writes that were killed. Pruning (``keep_last``) deletes only older checkpoints of the same
run (same ``run_id``), never another run's and never a later step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "Checkpoint",
    "checkpoint_problem",
    "latest_checkpoint",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_stale",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")
_STALE = re.compile(r"^\.(tmp|old)-checkpoint-\d+-")
MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "trainer_state.pt", "meta.json"


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read back (the model, optimiser and scheduler are restored in place)."""

    path: Path
    step: int
    data_state: Any = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None

    @classmethod
    def read(cls, folder: Path, meta: dict[str, Any], data_state: Any) -> Checkpoint:
        """The checkpoint in ``folder`` as its ``meta.json`` (already read) describes it."""
        return cls(
            path=folder,
            step=int(meta["step"]),
            data_state=data_state,
            metrics=meta["metrics"],
            extra=meta["extra"],
            run_id=meta.get("run_id"),
        )


def rng_state() -> dict[str, Any]:
    """The Python, NumPy (when installed), torch CPU and CUDA generator states as picklable plain values."""
    version, inner, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(inner), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # NumPy is optional: nothing to save
        return state
    np_state: Any = np.random.get_state()
    kind, keys, pos, has_gauss, cached = np_state
    state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, inner, gauss = state["python"]
    random.setstate((version, tuple(inner), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing memory (tied weights): later aliases get their own copy.
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[name] = t.clone() if key in seen else t
        seen.add(key)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the checkpoint folder ``path`` cannot be trusted (a missing, resized or altered file), or ``None``.

    Checkpoints written before checksums were recorded are checked for their files' presence only.
    """
    folder = Path(path)
    meta = _read_meta(folder)
    if meta is None:
        return f"{META_FILE} is missing or not valid JSON"
    files = meta.get("files")
    if not isinstance(files, dict):
        missing = [n for n in (MODEL_FILE, STATE_FILE) if not (folder / n).is_file()]
        return f"{missing[0]} is missing" if missing else None
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected.get("bytes"):
            return f"{name} has {file.stat().st_size} bytes, the checkpoint recorded {expected.get('bytes')}"
        if _sha256(file) != expected.get("sha256"):
            return f"{name} does not match its recorded SHA-256 (the file was altered or corrupted)"
    return None


def list_checkpoints(directory: str | os.PathLike[str], run_id: str | None = None) -> list[Path]:
    """Complete checkpoints under ``directory`` (only those of run ``run_id`` when given), oldest step first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / META_FILE).is_file()]
    if run_id is not None:
        found = [(step, p) for step, p in found if (_read_meta(p) or {}).get("run_id") == run_id]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step under ``directory``, or ``None`` (files not verified)."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def latest_valid_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest checkpoint under ``directory`` whose files match their checksums, or ``None``.

    Newer checkpoints that fail verification are skipped with a warning naming the problem (the run
    falls back to the previous valid one); they are left on disk for inspection.
    """
    for path in reversed(list_checkpoints(directory)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is not valid (%s): falling back to the previous checkpoint", path, problem)
    return None


def remove_stale(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary folders of checkpoint writes that were killed; returns what was removed."""
    root = Path(directory)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and _STALE.match(p.name)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by a checkpoint write that did not finish", path)
    return stale


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data_state: Any = None,
    metrics: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int = 0,
    extra_files: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` under ``directory`` atomically; return its path.

    Args:
        directory: The run's output folder.
        step: Optimiser steps done.
        model: Saved with ``safetensors.torch.save_file`` of its state dict.
        optimizer: Its ``state_dict()`` is saved.
        scheduler: Its ``state_dict()`` is saved.
        data_state: The data iterator's ``state_dict()`` (or ``None``).
        metrics: JSON-serialisable per-step records so far.
        extra: More JSON-serialisable values for ``meta.json``.
        keep_last: Delete older checkpoints of the same run beyond this many (0 keeps all).
        extra_files: ``{file name: value}`` written with ``torch.save`` into the folder before it is
            renamed into place (e.g. every rank's data state), so they are part of the atomic write.
        run_id: The run this checkpoint belongs to (recorded; pruning touches only this run's checkpoints).

    Raises:
        ValueError: An ``extra_files`` name is a path or collides with the checkpoint's own files.
    """
    extra_files = dict(extra_files or {})
    bad = [n for n in extra_files if n in (MODEL_FILE, STATE_FILE, META_FILE) or Path(n).name != n or n.startswith(".")]
    if bad:
        raise ValueError(f"extra_files names {bad} are not plain file names distinct from the checkpoint's own files")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_file(_model_tensors(model), str(tmp / MODEL_FILE))
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "data": data_state,
        }
        torch.save(state, tmp / STATE_FILE)
        for name, value in extra_files.items():
            torch.save(value, tmp / name)
        names = (MODEL_FILE, STATE_FILE, *extra_files)
        files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in names}
        meta = {"step": step, "run_id": run_id, "files": files, "metrics": metrics or [], "extra": extra or {}}
        (tmp / META_FILE).write_text(json.dumps(meta))
        for name in (*names, META_FILE):
            _fsync(tmp / name)
        _fsync(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
            stale = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=root))
            os.replace(final, stale / final.name)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        # only this run's earlier steps: another run's files, and later steps (left by a fallback), stay
        mine = [p for p in list_checkpoints(root, run_id=run_id) if int(_NAME.match(p.name).group(1)) < step]  # type: ignore[union-attr]
        for old in mine[: max(len(mine) - (keep_last - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> Checkpoint:
    """Restore ``model`` (and the optimiser, scheduler, RNG states when given) from a checkpoint folder.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint (the missing file named).
        ValueError: A file does not match its recorded checksum, or the model's keys differ from the
            checkpoint's (both lists named).
    """
    folder = Path(path)
    for name in (META_FILE, MODEL_FILE, STATE_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a complete checkpoint: {name} is missing")
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise ValueError(f"checkpoint {folder} is corrupted: {problem}")
    tensors = load_file(str(folder / MODEL_FILE))
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(tensors)), sorted(set(tensors) - own)
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not fit the model: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(tensors)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return Checkpoint.read(folder, json.loads((folder / META_FILE).read_text()), state["data"])
