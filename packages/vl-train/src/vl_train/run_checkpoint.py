"""Checkpoints of a training run on one process or on ``W`` FSDP2 ranks (save, and exact resume).

One process: :func:`vl_train.checkpoint.save_checkpoint` / :func:`~vl_train.checkpoint.load_checkpoint`.
``RunState(sharded=True)`` (``checkpoint_format = "sharded"``): every rank writes its shards with
``torch.distributed.checkpoint`` (:mod:`vl_train.dcp_checkpoint`); such a checkpoint loads on any world size.

``W > 1`` ranks (``torch.distributed`` initialised, the model sharded by :func:`vl_train.parallel.parallelize`):

- save: every rank takes part in gathering the full model state dict and the full optimiser state
  (``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True``) and in gathering each
  rank's data state and RNG states to rank 0 (``gather_object``); rank 0 writes one ordinary
  checkpoint (the same files as a single-process run) plus ``data-rank{r}.pt`` for every rank, all in
  the temporary folder before the atomic rename, so a complete checkpoint always holds every rank's file;
- resume: every rank reads the full files and loads them into its shards
  (``set_model_state_dict`` / ``set_optimizer_state_dict`` with ``full_state_dict=True``), restores the
  scheduler, and takes its own data state and RNG states from ``data-rank{r}.pt``.

Notation: ``W`` world size, ``r`` this rank.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .checkpoint import (
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    Checkpoint,
    checkpoint_problem,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .dcp_checkpoint import is_sharded_checkpoint, load_sharded_checkpoint, save_sharded_checkpoint
from .parallel import barrier, full_state_dict, is_main_process, rank, world_size

__all__ = ["RANK_DATA_FILE", "RunState", "load_run_checkpoint", "rank_data_file", "save_run_checkpoint"]

RANK_DATA_FILE = "data-rank{rank}.pt"


def rank_data_file(folder: str | os.PathLike[str], rank_index: int) -> Path:
    """Path of rank ``rank_index``'s data and RNG state inside checkpoint ``folder``."""
    return Path(folder) / RANK_DATA_FILE.format(rank=rank_index)


class _Snapshot(nn.Module):
    """Stands in for a sharded model / optimiser in ``save_checkpoint``: ``state_dict()`` is the gathered one."""

    def __init__(self, state: dict[str, Any]) -> None:
        super().__init__()
        self.state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.state


@dataclass
class RunState:
    """What a run's checkpoint holds besides the model and optimiser.

    Attributes:
        step: Optimiser steps done.
        data_state: This rank's data iterator state (``None`` when the data has no ``state_dict``).
        metrics: The metrics records so far.
        extra: JSON-serialisable values for ``meta.json`` (e.g. the config).
        keep_last: Older checkpoints of this run beyond this many are deleted (0 keeps all).
        run_id: The run's id (recorded in ``meta.json``; pruning touches only this run's checkpoints).
        sharded: Every rank writes its own shards with ``torch.distributed.checkpoint``
            (:mod:`vl_train.dcp_checkpoint`) instead of rank 0 writing the gathered state.
    """

    step: int
    data_state: Any = None
    metrics: list[dict[str, Any]] | None = None
    extra: dict[str, Any] | None = None
    keep_last: int = 0
    run_id: str | None = None
    sharded: bool = False


def save_run_checkpoint(
    output_dir: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    run: RunState,
) -> Path:
    """Write ``checkpoint-<step>`` atomically; a collective when distributed (every rank must call it).

    Returns:
        The checkpoint folder (on every rank; complete once this returns).
    """
    if run.sharded:
        return save_sharded_checkpoint(output_dir, model, optimizer, scheduler, run)
    if world_size() == 1:
        return save_checkpoint(
            output_dir,
            step=run.step,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            data_state=run.data_state,
            metrics=run.metrics,
            extra=run.extra,
            keep_last=run.keep_last,
            run_id=run.run_id,
        )
    from torch.distributed.checkpoint import state_dict as dcp

    snapshot = _Snapshot(full_state_dict(model))
    options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    optim_state = dcp.get_optimizer_state_dict(model, optimizer, options=options)
    mine = {"data": run.data_state, "rng": rng_state()}
    gathered: list[Any] | None = [None] * world_size() if is_main_process() else None
    torch.distributed.gather_object(mine, gathered, dst=0)
    final = Path(output_dir) / f"checkpoint-{run.step:08d}"
    if is_main_process():
        assert gathered is not None
        files = {RANK_DATA_FILE.format(rank=r): state for r, state in enumerate(gathered)}
        final = save_checkpoint(
            output_dir,
            step=run.step,
            model=snapshot,
            optimizer=_Snapshot(optim_state),  # type: ignore[arg-type]
            scheduler=scheduler,
            data_state=None,
            metrics=run.metrics,
            extra={**(run.extra or {}), "world_size": world_size()},
            keep_last=run.keep_last,
            extra_files=files,
            run_id=run.run_id,
        )
    barrier()  # no rank goes on (or resumes) before the folder is in place
    return final


def load_run_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> Checkpoint:
    """Restore the model, optimiser, scheduler, RNG and this rank's data state from a checkpoint folder.

    Every rank must call it when distributed. The returned ``data_state`` is this rank's.

    Raises:
        FileNotFoundError: The folder is not a complete checkpoint, or has no data file for this rank.
        ValueError: The checkpoint was written by a different number of ranks than the current run has, or a
            file does not match its recorded checksum.
    """
    folder = Path(path)
    if is_sharded_checkpoint(folder):  # any world size: DCP reshards
        return load_sharded_checkpoint(folder, model, optimizer, scheduler)
    if world_size() == 1:
        ckpt = load_checkpoint(folder, model=model, optimizer=optimizer, scheduler=scheduler)
        saved_world = int(ckpt.extra.get("world_size", 1))
        if saved_world != 1:
            raise ValueError(f"checkpoint {folder} was written by {saved_world} ranks; resume it with {saved_world}")
        return ckpt
    from torch.distributed.checkpoint import state_dict as dcp

    for name in (META_FILE, MODEL_FILE, STATE_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a complete checkpoint: {name} is missing")
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise ValueError(f"checkpoint {folder} is corrupted: {problem}")
    meta = json.loads((folder / META_FILE).read_text())
    saved_world = int(meta["extra"].get("world_size", 1))
    if saved_world != world_size():
        raise ValueError(
            f"checkpoint {folder} was written by {saved_world} rank(s) but this run has {world_size()}: "
            "each rank's data position is stored per rank, so resume with the same number of ranks"
        )
    mine_file = rank_data_file(folder, rank())
    if not mine_file.is_file():
        raise FileNotFoundError(f"{folder} has no data state for rank {rank()} ({mine_file.name} is missing)")
    options = dcp.StateDictOptions(full_state_dict=True)
    full: dict[str, Any] = dict(load_file(str(folder / MODEL_FILE)))
    dcp.set_model_state_dict(model, full, options=options)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    dcp.set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    scheduler.load_state_dict(state["scheduler"])
    mine = torch.load(mine_file, map_location="cpu", weights_only=True)
    set_rng_state(mine["rng"])
    return Checkpoint.read(folder, meta, mine["data"])
