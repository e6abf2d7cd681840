"""The run every trainer shares: parts, optimiser, parallelism, checkpoints, metrics, callbacks, guard.

:class:`TrainingLoop` owns everything a training run has besides its step, so that ``Trainer``
(supervised), ``DistillTrainer`` and ``vl_rl.RLTrainer`` each implement only :meth:`TrainingLoop.train_step`:

- freezes the parts outside ``config.trainable`` and builds AdamW over the rest with the warm-up +
  cosine schedule of ``config.optim`` (:mod:`vl_train.optim`);
- with ``W > 1`` ranks shards the model with FSDP2 (:func:`vl_train.parallel.parallelize`); alone, turns
  on activation checkpointing when asked;
- :meth:`TrainingLoop.optimizer_step`: clip, then step only if the losses and the gradient norm are
  finite (else the gradients are dropped and the step marked ``skipped``); ``config.max_nan_steps``
  consecutive skipped steps stop the run;
- the loop: ``train_step`` -> schedule step -> metrics (``metrics.jsonl``, TensorBoard, progress bar) ->
  checkpoint every ``save_every`` steps -> callbacks; a final checkpoint and a PNG at the end;
- checkpoints through :mod:`vl_train.run_checkpoint` (one process or FSDP ranks alike), holding the
  model, optimiser, scheduler, RNG, the step's data state and what the subclass adds
  (:meth:`TrainingLoop.extra_state`), each file's checksum and the run's id; ``resume`` restores all of
  it from the newest checkpoint that verifies (falling back past a corrupted one, with a warning), and
  refuses a checkpoint whose settings differ from the run's (the fields named);
- never loses work (:mod:`vl_train.run_safety`): a fresh run refuses an output folder that holds another
  run unless asked to ``overwrite`` it; SIGINT / SIGTERM finish the step, write a checkpoint and stop the
  run (``stopped_reason`` ``"interrupted (SIGINT)"``); pruning (``keep_last``) touches this run's
  checkpoints only.

Callbacks: ``callback(trainer, record)`` after every step (and its checkpoint); a truthy return value
stops the run (``stopped_reason == "callback"``).

Notation: ``W`` world size.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vl_model.parts import freeze, unfreeze

from .checkpoint import latest_valid_checkpoint
from .config import PARTS, RunConfig
from .losses import check_finite_loss
from .metrics import PLOT_FILE, MetricsLogger, NonFiniteGuard, RankMetrics, plot_loss_curve
from .optim import build_optimizer, build_scheduler
from .parallel import is_main_process, parallelize, world_size
from .run_checkpoint import RunState, load_run_checkpoint, save_run_checkpoint
from .run_safety import OutputDirError, StopSignals, claim_output_dir, config_changes

__all__ = ["Callback", "OutputDirError", "TrainResult", "TrainingLoop", "check_output_dir"]

log = logging.getLogger(__name__)

Callback = Callable[[Any, dict[str, Any]], object]
"""``callback(trainer, record)``; a truthy return value stops the run."""


@dataclass
class TrainResult:
    """How a run ended.

    Attributes:
        steps: Steps done (skipped ones included), counting those before a resume.
        losses: Loss of every step (``nan`` for a step without one).
        stopped_reason: ``"max_steps"``, ``"data_exhausted"``, ``"callback"`` or the non-finite-loss message.
        output_dir: Where the metrics, plots and checkpoints are.
        skipped_steps: Steps skipped for a non-finite loss or gradient.
        checkpoint: The last checkpoint written (``None`` when none was).
        eval_loss: Mean per-token loss on the evaluation batches at the end (``None`` without them).
        plot: The run's PNG (``None`` when not written).
        records: The metrics record of every step.
        data_stats: Counts of what the data pipeline rendered, skipped, dropped and truncated (empty when the
            batches do not count).
    """

    steps: int
    losses: list[float]
    stopped_reason: str
    output_dir: Path
    skipped_steps: int = 0
    checkpoint: Path | None = None
    eval_loss: float | None = None
    plot: Path | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    data_stats: dict[str, int] = field(default_factory=dict)


def check_output_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and prove it writable by writing a probe file; raise :class:`OutputDirError` if not."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise OutputDirError(
            f"output directory {str(folder)!r} is not writable ({type(exc).__name__}: {exc}); "
            "fix its permissions or set another output_dir"
        ) from exc
    return folder


class TrainingLoop:
    """The shared run around a trainer's step (see the module docstring).

    Args:
        model: A :class:`vl_model.TrainableVLM` (core or composed model). Parts outside
            ``config.trainable`` are frozen here.
        config: The run's settings (a :class:`~vl_train.config.RunConfig` or a subclass).
        callbacks: ``callback(trainer, record)`` after every step; a truthy return value stops the run.
        resume: ``True``: continue from the latest valid checkpoint in ``config.output_dir`` (a fresh start
            when there is none); a path: from that checkpoint (or the latest valid one inside that folder).
            The checkpoint is loaded at the end of this constructor, so a subclass sets what
            :meth:`load_data_state` / :meth:`load_extra_state` restore before calling it.
        overwrite: Start afresh in an output folder that holds another run, deleting that run's
            checkpoints and metrics (without it, such a folder is an error).

    Raises:
        OutputDirError: ``config.output_dir`` cannot be written, or holds another run (neither ``resume``
            nor ``overwrite`` given); before any training.
        FileNotFoundError: ``resume`` names a folder without a checkpoint.
        ValueError: The checkpoint does not fit (another world size, other model keys, changed settings).
    """

    def __init__(
        self,
        model: nn.Module,
        config: RunConfig,
        *,
        callbacks: Sequence[Callback] = (),
        resume: bool | str | os.PathLike[str] = False,
        overwrite: bool = False,
    ) -> None:
        self.config = config
        self.model = model
        self.callbacks = list(callbacks)
        self.distributed = world_size() > 1
        self.output_dir = Path(config.output_dir)
        self._claim_output_dir(resume=bool(resume), overwrite=overwrite)
        self.run_id = uuid.uuid4().hex
        torch.manual_seed(config.seed)
        freeze(model, [p for p in PARTS if p not in config.trainable])
        unfreeze(model, config.trainable)
        self._prepare_model()
        self.optimizer = build_optimizer(model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, config.max_steps)
        self.device = next(model.parameters()).device
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        if resume:
            self.resume(None if resume is True else resume)

    def _claim_output_dir(self, *, resume: bool, overwrite: bool) -> None:
        """Rank 0 checks (and with ``overwrite`` clears) the output folder; every rank raises its verdict."""
        problem: str | None = None
        if is_main_process():
            try:
                check_output_dir(self.output_dir)
                claim_output_dir(self.output_dir, resume=resume, overwrite=overwrite)
            except OutputDirError as exc:
                problem = str(exc)
        if self.distributed:  # the same verdict everywhere: no rank waits in a collective for one that raised
            verdict = [problem]
            torch.distributed.broadcast_object_list(verdict, src=0)
            problem = verdict[0]
        if problem is not None:
            raise OutputDirError(problem)

    # ------------------------------------------------------------------ subclasses implement / extend

    def train_step(self) -> dict[str, Any]:
        """One step; returns its metrics record (``step`` is set by the loop; ``skipped``: no update).

        Raises:
            StopIteration: The data ran out (the run ends with ``"data_exhausted"``).
        """
        raise NotImplementedError

    def data_state(self) -> Any:
        """This rank's data position for a checkpoint (``None``: nothing to restore)."""
        return None

    def load_data_state(self, state: Any) -> None:
        """Restore what :meth:`data_state` returned."""

    def extra_state(self) -> dict[str, Any]:
        """JSON-serialisable values a checkpoint keeps besides the config (e.g. evaluation history)."""
        return {}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def on_train_start(self) -> None:
        """Called once before the first step of :meth:`train` (after a resume)."""

    def after_step(self, record: dict[str, Any]) -> None:
        """Called after each step, before the record is logged (add to the record here)."""

    def plot(self, records: Sequence[dict[str, Any]]) -> Path | None:
        """Write the run's PNG at the end (default: the loss curve); ``None`` when not written."""
        return plot_loss_curve(records, self.output_dir / PLOT_FILE)

    def finish(self, result: TrainResult) -> TrainResult:
        """Called with the result at the end of :meth:`train`; may add to it."""
        return result

    # ------------------------------------------------------------------ shared pieces of a step

    def _prepare_model(self) -> None:
        model, cfg = self.model, self.config
        context_parallel = int(getattr(cfg, "context_parallel", 1))
        if context_parallel > 1 and not self.distributed:
            raise ValueError(f"context_parallel = {context_parallel} needs that many ranks: launch with torchrun")
        if self.distributed:
            from torch.distributed.fsdp import FSDPModule

            if not isinstance(model, FSDPModule):  # an already sharded model keeps its own setup
                parallelize(
                    model,
                    activation_checkpointing=cfg.activation_checkpointing,
                    context_parallel=context_parallel,
                    expert_parallel=int(getattr(cfg, "expert_parallel", 1)),
                )
        elif cfg.activation_checkpointing:
            # Non-reentrant: frozen inputs (S0's frozen embeddings) must not cut the layers' gradients.
            enable: Any = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:  # transformers >= 5.x name; the old one warns it is deprecated
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def optimizer_step(self, *losses: torch.Tensor) -> tuple[float, bool]:
        """Clip the accumulated gradients and step AdamW if ``losses`` and the gradient norm are finite.

        A collective under FSDP (the norm is global). The gradients are cleared either way.

        Returns:
            ``(gradient norm before clipping, whether the optimiser stepped)``.
        """
        max_norm = self.config.optim.max_grad_norm
        norm: Any = torch.nn.utils.clip_grad_norm_(
            self.trainable_parameters(), max_norm if max_norm is not None else math.inf
        )
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        finite = all(check_finite_loss(loss) for loss in losses) and check_finite_loss(norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), finite

    def learning_rates(self) -> dict[str, float]:
        """``{"lr/<part>": rate}`` of every optimiser group now."""
        return {f"lr/{g['part']}": float(g["lr"]) for g in self.optimizer.param_groups}

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        """Write a checkpoint of the current step atomically (a collective under FSDP); returns its folder."""
        cfg = self.config
        extra = {"config": cfg.to_dict(), **self.extra_state()}
        run = RunState(
            self.step,
            self.data_state(),
            self.history,
            extra,
            cfg.keep_last,
            self.run_id,
            sharded=cfg.checkpoint_format == "sharded",
        )
        self.last_checkpoint = save_run_checkpoint(self.output_dir, self.model, self.optimizer, self.scheduler, run)
        return self.last_checkpoint

    def resume(self, where: str | os.PathLike[str] | None = None) -> bool:
        """Restore the newest valid checkpoint in ``where`` (default: the output folder), or ``where`` itself.

        Returns:
            Whether a checkpoint was loaded (False: none in the output folder, a fresh start).

        Raises:
            FileNotFoundError: ``where`` is another folder and holds no valid checkpoint.
            ValueError: The checkpoint's settings differ from this run's (the fields named), it was written by
                another number of ranks, or does not fit the model.
        """
        folder = Path(where) if where is not None else self.output_dir
        path = folder if (folder / "meta.json").is_file() else latest_valid_checkpoint(folder)
        if path is None:
            if folder != self.output_dir:
                raise FileNotFoundError(f"no valid checkpoint to resume from in {folder}")
            log.info("no checkpoint in %s: starting from step 0", folder)
            return False
        ckpt = load_run_checkpoint(path, self.model, self.optimizer, self.scheduler)
        changed = config_changes(ckpt.extra.get("config", {}), self.config.to_dict())
        if changed:
            raise ValueError(
                f"cannot resume {path} with changed settings ({'; '.join(changed)}): resume with the run's "
                "settings, or start a new run in another folder"
            )
        self.step, self.history, self.last_checkpoint = ckpt.step, list(ckpt.metrics), path
        self.run_id = ckpt.run_id or self.run_id
        self.load_extra_state(dict(ckpt.extra))
        if ckpt.data_state is not None:
            self.load_data_state(ckpt.data_state)
        self.resumed_from = path
        log.warning("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ the loop

    def _metrics(self) -> MetricsLogger | RankMetrics:
        cfg = self.config
        if not is_main_process():
            return RankMetrics(self.history)
        return MetricsLogger(
            self.output_dir,
            total_steps=cfg.max_steps,
            tensorboard=cfg.tensorboard,
            progress=cfg.progress,
            history=self.history,
        )

    def _call_callbacks(self, record: dict[str, Any]) -> bool:
        # every callback runs (none is starved by an earlier one asking to stop)
        return any([bool(callback(self, record)) for callback in self.callbacks])

    def train(self) -> TrainResult:
        """Run until ``max_steps`` (or the data ends, a callback stops it, or losses stay non-finite)."""
        cfg = self.config
        self.model.train()
        metrics = self._metrics()
        self.history = metrics.records
        reason, guard, plot = "max_steps", NonFiniteGuard(cfg.max_nan_steps), None
        signals = StopSignals()
        try:
            signals.__enter__()
            self.on_train_start()
            while self.step < cfg.max_steps:
                try:
                    record = self.train_step()
                except StopIteration:
                    reason = "data_exhausted"
                    break
                with warnings.catch_warnings():
                    # A skipped step still advances the schedule (it counts as a step); torch warns about that.
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                    self.scheduler.step()
                self.step += 1
                record = {"step": self.step, **record}
                record.setdefault("skipped", False)
                self.after_step(record)
                metrics.log(record)
                stop = guard.update(self.step, record)
                if stop is not None:
                    reason = stop
                    break
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                if self._call_callbacks(record):
                    reason = "callback"
                    break
                if _agreed_stop(signals.requested):
                    reason = f"interrupted ({signals.requested or 'on another rank'})"
                    break
            saved = self.last_checkpoint is not None and self.last_checkpoint.name == f"checkpoint-{self.step:08d}"
            if not reason.startswith("non-finite") and self.step > 0 and not saved:
                self.save()
        finally:
            signals.__exit__()
            metrics.close(plot=False)
        if cfg.plot and is_main_process() and self.history:
            plot = self.plot(self.history)
        result = TrainResult(
            steps=self.step,
            losses=[float(r.get("loss", math.nan)) for r in self.history],
            stopped_reason=reason,
            output_dir=self.output_dir,
            skipped_steps=sum(bool(r.get("skipped")) for r in self.history),
            checkpoint=self.last_checkpoint,
            plot=plot,
            records=list(self.history),
        )
        return self.finish(result)


def _agreed_stop(requested: str | None) -> bool:
    """Whether any rank received a stop signal (every rank must stop at the same step)."""
    if world_size() == 1:
        return requested is not None
    flag = torch.tensor([1.0 if requested else 0.0])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def iterate(batches: Iterable[Any]) -> Any:
    """An iterator over ``batches`` (itself when it already is one, so its position is kept)."""
    return batches if hasattr(batches, "__next__") else iter(batches)
