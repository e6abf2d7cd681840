"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards.

A full checkpoint (:mod:`vl_train.run_checkpoint`) gathers the whole model and optimiser state on rank 0,
which does not fit at 30B+ parameters. With ``checkpoint_format = "sharded"`` each rank writes the shards
it holds (FSDP2 parameter shards, expert-parallel experts, their AdamW moments) with DCP, in the same
checkpoint layout and with the same guarantees:

- ``checkpoint-<step:08d>/sharded/``: DCP's files (``__<rank>_<i>.distcp`` per rank, ``.metadata``);
- ``data-rank{r}.pt``: rank ``r``'s data position and RNG states (written by rank ``r`` itself);
- ``trainer_state.pt``: the scheduler (the same on every rank);
- ``meta.json`` (last): step, run id, ``"format": "sharded"``, the world size, and every file's size and
  SHA-256; each rank hashes the files it wrote, so no rank reads the others' shards.

Atomic: rank 0 creates the temporary folder, every rank writes into it (a shared file system, as DCP
needs), and once all are done rank 0 writes ``meta.json`` and renames the folder into place; a run
killed at any moment leaves the previous checkpoint. Verified and with fallback: ``meta.json``'s
checksums are those :func:`vl_train.checkpoint.latest_valid_checkpoint` checks, so a corrupted sharded
checkpoint is skipped like a full one; on load the ranks verify a share of the files each.

Resume on another world size: DCP reshards the model and optimiser states onto the new ranks (any ``W``,
one process included). The data positions are per rank: another world size takes them when every saved
rank had the same one (a global position, as a sampler over global batches keeps), else it is an error
naming the ranks that differ. :func:`export_pretrained` writes one Hugging Face checkpoint from a sharded
(or full) one on a single process, without a process group.

Notation: ``W`` world size, ``r`` this rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import (
    META_FILE,
    STATE_FILE,
    Checkpoint,
    _fsync,
    _sha256,
    list_checkpoints,
    rng_state,
    set_rng_state,
)
from .parallel import barrier, is_main_process, rank, world_size

__all__ = [
    "SHARDED_DIR",
    "SHARDED_FORMAT",
    "export_pretrained",
    "is_sharded_checkpoint",
    "load_sharded_checkpoint",
    "save_sharded_checkpoint",
]

log = logging.getLogger(__name__)

SHARDED_FORMAT = "sharded"
SHARDED_DIR = "sharded"
_DATA_FILE = "data-rank{rank}.pt"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that one process without a process group saves or loads alone (the intent here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _broadcast(value: Any) -> Any:
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any) -> list[Any]:
    if not _distributed():
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether the checkpoint folder ``path`` was written by :func:`save_sharded_checkpoint`."""
    try:
        meta = json.loads((Path(path) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == SHARDED_FORMAT


def _record(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in names:
        _fsync(folder / name)
        out[name] = {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
    return out


def _states(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded_checkpoint(
    output_dir: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    run: Any,
) -> Path:
    """Write ``checkpoint-<step>`` with every rank's shards, atomically; a collective (every rank calls it).

    Args:
        output_dir: The run's folder.
        model: The (sharded) model.
        optimizer: Its optimiser.
        scheduler: Its learning-rate schedule.
        run: A :class:`vl_train.run_checkpoint.RunState` (step, this rank's data state, metrics, extra, ...).

    Returns:
        The checkpoint folder (complete on every rank once this returns).
    """
    import torch.distributed.checkpoint as dcp

    root = Path(output_dir)
    final = root / f"checkpoint-{run.step:08d}"
    tmp_name = None
    if is_main_process():
        root.mkdir(parents=True, exist_ok=True)
        tmp_name = tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root)
    tmp = Path(_broadcast(tmp_name))
    try:
        writer = dcp.FileSystemWriter(str(tmp / SHARDED_DIR))
        with _single_process_quiet():
            dcp.save(_states(model, optimizer), storage_writer=writer, no_dist=not _distributed())
        mine = _DATA_FILE.format(rank=rank())
        torch.save({"data": run.data_state, "rng": rng_state()}, tmp / mine)
        shards = sorted(f"{SHARDED_DIR}/{p.name}" for p in (tmp / SHARDED_DIR).glob(f"__{rank()}_*.distcp"))
        written = [mine, *shards]
        if is_main_process():
            torch.save({"scheduler": scheduler.state_dict()}, tmp / STATE_FILE)
            written += [STATE_FILE, *(f"{SHARDED_DIR}/{p.name}" for p in (tmp / SHARDED_DIR).glob(".metadata"))]
        files: dict[str, Any] = {}
        for part in _gather(_record(tmp, written)):
            files.update(part)
        barrier()
        if is_main_process():
            meta = {
                "step": run.step,
                "run_id": run.run_id,
                "format": SHARDED_FORMAT,
                "files": files,
                "metrics": run.metrics or [],
                "extra": {**(run.extra or {}), "world_size": world_size()},
            }
            (tmp / META_FILE).write_text(json.dumps(meta))
            _fsync(tmp / META_FILE)
            _fsync(tmp / SHARDED_DIR)
            _fsync(tmp)
            if final.exists():  # re-saving a step (after a resume): move the old one aside first
                stale = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=root))
                os.replace(final, stale / final.name)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, final)
            _fsync(root)
            _prune(root, run)
    except BaseException:
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()  # no rank goes on (or resumes) before the folder is in place
    return final


def _prune(root: Path, run: Any) -> None:
    if run.keep_last <= 0:
        return
    mine = [p for p in list_checkpoints(root, run_id=run.run_id) if int(p.name.split("-")[1]) < run.step]
    for old in mine[: max(len(mine) - (run.keep_last - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def _verify_share(folder: Path, meta: dict[str, Any]) -> None:
    """Every rank checks every ``W``-th file against its recorded size and SHA-256; all ranks raise together."""
    names = sorted(meta.get("files", {}))
    problem = None
    for name in names[rank() :: world_size()]:
        expected, file = meta["files"][name], folder / name
        if not file.is_file():
            problem = f"{name} is missing"
        elif file.stat().st_size != expected.get("bytes") or _sha256(file) != expected.get("sha256"):
            problem = f"{name} does not match its recorded size and SHA-256 (the file was altered or corrupted)"
        if problem:
            break
    problems = [p for p in _gather(problem) if p]
    if problems:
        raise ValueError(f"checkpoint {folder} is corrupted: {problems[0]}")


def _data_state(folder: Path, saved_world: int) -> dict[str, Any]:
    """This rank's data position and RNG states (another world size: the common position of every saved rank)."""
    if saved_world == world_size():
        return dict(torch.load(folder / _DATA_FILE.format(rank=rank()), map_location="cpu", weights_only=True))
    saved = [
        torch.load(folder / _DATA_FILE.format(rank=r), map_location="cpu", weights_only=True)
        for r in range(saved_world)
    ]
    differ = [r for r in range(1, saved_world) if saved[r]["data"] != saved[0]["data"]]
    if differ:
        raise ValueError(
            f"checkpoint {folder} was written by {saved_world} ranks whose data positions differ (ranks 0 and "
            f"{differ}): resume it with {saved_world} ranks, or use data whose state is a global position"
        )
    return {"data": saved[0]["data"], "rng": saved[min(rank(), saved_world - 1)]["rng"]}


def load_sharded_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any
) -> Checkpoint:
    """Restore a sharded checkpoint into ``model`` (any world size, one process included); every rank calls it.

    Raises:
        FileNotFoundError: ``path`` is not a complete checkpoint.
        ValueError: A file does not match its checksum, or the world size changed and the ranks' data
            positions differ.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    folder = Path(path)
    if not (folder / META_FILE).is_file() or not is_sharded_checkpoint(folder):
        raise FileNotFoundError(f"{folder} is not a complete sharded checkpoint ({META_FILE} missing or not sharded)")
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    _verify_share(folder, meta)
    saved_world = int(meta["extra"].get("world_size", 1))
    mine = _data_state(folder, saved_world)
    state = _states(model, optimizer)
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(folder / SHARDED_DIR), no_dist=not _distributed())
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)["scheduler"])
    set_rng_state(mine["rng"])
    if saved_world != world_size():
        log.warning("resumed %s, written by %d ranks, on %d", folder, saved_world, world_size())
    return Checkpoint.read(folder, meta, mine["data"])


def export_pretrained(
    checkpoint: str | os.PathLike[str], model: nn.Module, out_dir: str | os.PathLike[str], *, official: bool = False
) -> Path:
    """Write one Hugging Face checkpoint from a training checkpoint (sharded or full), on one process.

    Args:
        checkpoint: A ``checkpoint-<step>`` folder (or a run folder: its newest valid one).
        model: An unsharded model of the run's architecture (its weights are replaced), e.g. built from the
            run's config; no process group is needed.
        out_dir: Where the Hugging Face checkpoint goes.
        official: Write the official ``qwen3_vl`` / ``qwen3_vl_moe`` layout (``vl_model.export_qwen3_vl``)
            instead of ``save_pretrained``'s.

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError: No valid checkpoint at ``checkpoint``.
        ValueError: A file does not match its checksum, or the weights do not fit ``model``.
    """
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from .checkpoint import MODEL_FILE, checkpoint_problem, latest_valid_checkpoint

    folder = Path(checkpoint)
    if not (folder / META_FILE).is_file():
        found = latest_valid_checkpoint(folder)
        if found is None:
            raise FileNotFoundError(f"no valid checkpoint in {folder}")
        folder = found
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise ValueError(f"checkpoint {folder} is corrupted: {problem}")
    if is_sharded_checkpoint(folder):
        state = {"model": model.state_dict()}
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(folder / SHARDED_DIR), no_dist=True)
        weights = state["model"]
    else:
        weights = load_file(str(folder / MODEL_FILE))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise ValueError(f"the weights of {folder} do not fit {type(model).__name__}: {exc}") from None
    out = Path(out_dir)
    if official:
        from vl_model import export_qwen3_vl

        export_qwen3_vl(model, out)  # type: ignore[arg-type]
    else:
        model.save_pretrained(str(out))  # type: ignore[operator]
    return out
