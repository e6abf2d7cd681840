"""The training loop: gradient accumulation with a global loss normaliser, AdamW, clipping, checkpoints.

One optimiser step (REFERENCE.md section 4; the loss is :func:`vl_train.losses.lm_loss`):

1. draw ``A = grad_accum_steps`` micro-batches; compute the normaliser ``Z`` of the chosen reduction
   over all of them and over every data-parallel rank (:func:`~vl_train.losses.global_loss_normalizer`);
2. for each micro-batch: hidden states ``h = model.model(...)``, targets ``y_t = labels_{t+1}`` (the
   shift happens here), ``loss_m = lm_loss(h, W_head, y, normalizer=Z)`` plus the MoE balance loss, its
   expert counts global over the step by default (:class:`vl_train.step.StepLoss`); back-propagate
   ``W x loss_m`` (``W`` ranks: DDP/FSDP average gradients, the global ``Z`` wants sums);
3. if any ``loss_m`` or the gradient norm is not finite, the step is skipped (gradients dropped,
   weights and optimiser state untouched) and logged; ``max_nan_steps`` consecutive ones stop the run;
4. otherwise clip the gradient norm, step AdamW, step the warm-up + cosine schedule.

``sum_m loss_m`` is then the loss of the whole global batch and its gradient that of one big batch.

With ``W > 1`` ranks (``torch.distributed`` initialised) the model is sharded with FSDP2
(:func:`vl_train.parallel.parallelize`), each micro-batch's forward and loss run through
:func:`~vl_train.parallel.root_forward`, checkpoints hold the gathered full state plus every rank's data
state, only rank 0 writes files, and a resumed run reloads them into every rank's shards
(:mod:`vl_train.run_checkpoint`).

Notation: ``A`` micro-batches per step, ``W`` world size, ``Z`` global normaliser, ``W_head`` the LM head.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vl_model.parts import freeze, unfreeze

from .checkpoint import latest_checkpoint
from .config import PARTS, TrainConfig
from .losses import IGNORE_INDEX, check_finite_loss, global_loss_normalizer, loss_normalizer
from .metrics import MetricsLogger, NonFiniteGuard, RankMetrics
from .optim import build_optimizer, build_scheduler
from .parallel import is_main_process, parallelize, world_size
from .run_checkpoint import RunState, load_run_checkpoint, save_run_checkpoint
from .step import MODEL_INPUTS, StepLoss, shift_labels

__all__ = ["MODEL_INPUTS", "OutputDirError", "TrainResult", "Trainer", "check_output_dir", "shift_labels"]

log = logging.getLogger(__name__)

Callback = Callable[["Trainer", dict[str, Any]], object]


class OutputDirError(ValueError):
    """The output directory cannot be created or written."""


@dataclass
class TrainResult:
    """How a run ended.

    Attributes:
        steps: Optimiser steps done (skipped ones included), counting those before a resume.
        losses: Loss of every step (``nan`` / ``inf`` for skipped ones).
        stopped_reason: ``"max_steps"``, ``"data_exhausted"``, ``"callback"`` or the non-finite-loss message.
        output_dir: Where the metrics, plots and checkpoints are.
        skipped_steps: Steps skipped for a non-finite loss.
        checkpoint: The last checkpoint written (``None`` when none was).
        eval_loss: Mean per-token loss on ``eval_batches`` at the end (``None`` without them).
        plot: The loss-curve PNG (``None`` when not written).
        records: The metrics record of every step.
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


def _all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        torch.distributed.all_reduce(value)
    return value


class Trainer:
    """Trains a ``VLForConditionalGeneration`` with a :class:`~vl_train.config.TrainConfig`.

    Args:
        model: The model (``model.model(...)`` gives hidden states, ``model.lm_head`` projects them).
            Parts outside ``config.trainable`` are frozen here.
        config: The run's settings.
        train_batches: Batches (dicts with ``input_ids``, ``labels`` and optionally ``attention_mask``,
            ``segment_ids``, pixel inputs, ...), one micro-batch each. When the object has
            ``state_dict()`` / ``load_state_dict()`` (describing the batches drawn so far), its state
            is checkpointed and restored on resume, so the data continues where it stopped.
        eval_batches: Batches for a mean per-token loss at the end of the run.
        callbacks: ``callback(trainer, record)`` after every step (and its checkpoint); a truthy
            return value stops the run.
        resume: ``True``: continue from the latest checkpoint in ``config.output_dir`` (if any); a
            path: from that checkpoint (or the latest one inside that folder).

    Raises:
        OutputDirError: ``config.output_dir`` cannot be created or written (before any training).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_batches: Iterable[dict[str, Any]],
        *,
        eval_batches: Iterable[dict[str, Any]] | None = None,
        callbacks: Sequence[Callback] = (),
        resume: bool | str | os.PathLike[str] = False,
    ) -> None:
        self.config = config
        self.distributed = world_size() > 1
        self.output_dir = check_output_dir(config.output_dir) if is_main_process() else Path(config.output_dir)
        self.model, self.data = model, train_batches
        self._batches = self._iterator()
        self.eval_batches, self.callbacks = eval_batches, list(callbacks)
        torch.manual_seed(config.seed)
        freeze(model, [p for p in PARTS if p not in config.trainable])
        unfreeze(model, config.trainable)
        if self.distributed:
            from torch.distributed.fsdp import FSDPModule

            if not isinstance(model, FSDPModule):  # an already sharded model keeps its own setup
                parallelize(model, activation_checkpointing=config.activation_checkpointing)
        elif config.activation_checkpointing:
            # Non-reentrant: frozen inputs (S0's frozen embeddings) must not cut the layers' gradients.
            enable: Any = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:  # transformers >= 5.x name; the old one warns it is deprecated
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.device = next(model.parameters()).device
        inner: Any = model.model
        self.loss = StepLoss(model, torch.compile(inner) if config.compile else inner, config, self._autocast)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        if resume:
            self._resume(self.output_dir if resume is True else Path(resume))

    def _iterator(self) -> Iterator[dict[str, Any]]:
        return self.data if isinstance(self.data, Iterator) else iter(self.data)

    def _data_state(self) -> Any:
        get = getattr(self.data, "state_dict", None)
        return get() if callable(get) else None

    def state_dict(self) -> dict[str, Any]:
        """Step, model, optimiser, scheduler, data state and metrics (what a checkpoint holds)."""
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self._data_state(),
            "metrics": list(self.history),
        }

    def save(self) -> Path:
        """Write a checkpoint of the current step atomically (a collective under FSDP); returns its folder."""
        cfg = self.config
        run = RunState(self.step, self._data_state(), self.history, {"config": cfg.to_dict()}, cfg.keep_last)
        self.last_checkpoint = save_run_checkpoint(self.output_dir, self.model, self.optimizer, self.scheduler, run)
        return self.last_checkpoint

    def _resume(self, where: Path) -> None:
        path = where if (where / "meta.json").is_file() else latest_checkpoint(where)
        if path is None:
            if where != self.output_dir:
                raise FileNotFoundError(f"no checkpoint to resume from in {where}")
            log.info("no checkpoint in %s: starting from step 0", where)
            return
        ckpt = load_run_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.step, self.history, self.last_checkpoint = ckpt.step, list(ckpt.metrics), path
        load = getattr(self.data, "load_state_dict", None)
        if ckpt.data_state is not None and callable(load):
            load(ckpt.data_state)
            self._batches = self._iterator()
        else:
            log.warning("resuming at step %d without a data state: batches restart from the beginning", self.step)
        log.info("resumed from %s at step %d", path, self.step)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        bf16 = self.config.bf16
        if bf16 is True or (bf16 == "auto" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def micro_batch_loss(
        self, batch: dict[str, Any], targets: torch.Tensor, normalizer: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(lm_loss, moe_aux_loss or None)`` of one micro-batch with the step's normaliser (see ``vl_train.step``)."""
        return self.loss(batch, targets, normalizer)

    def accumulate(self, micro: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one step's micro-batches: gradients accumulate in the parameters.

        Returns:
            ``(loss, moe_aux_loss)`` of the global batch (summed over micro-batches and ranks; float64).
        """
        cfg, world = self.config, world_size()
        targets = [shift_labels(b["labels"]) for b in micro]
        z = global_loss_normalizer(
            [loss_normalizer(t, b.get("segment_ids"), cfg.loss_reduction) for t, b in zip(targets, micro, strict=True)]
        )
        counted = self.loss.global_balance and len(micro) > 1
        if counted:  # global-batch MoE balance: every micro-batch's routing is counted before any loss
            self.loss.count_routing(micro)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        aux_total = torch.zeros_like(total)
        for batch, y in zip(micro, targets, strict=True):
            loss, aux = self.loss(batch, y, z, counted=counted)
            # DDP/FSDP average gradients over ranks; the global normaliser wants sums (so does the
            # global-batch balance loss; the per-micro-batch one is a mean over ranks).
            objective = loss * world
            if aux is not None:
                objective = objective + (aux * world if self.loss.global_balance else aux)
                aux_total += aux.detach().double()
            # Every rank runs every backward (FSDP collectives must match); a bad loss marks the step.
            objective.backward()
            total += loss.detach().double()
        _all_reduce_sum(total)
        _all_reduce_sum(aux_total)
        if not self.loss.global_balance:
            aux_total /= world
        return total, aux_total

    def train_step(self) -> dict[str, Any]:
        """One optimiser step over ``grad_accum_steps`` micro-batches; returns its metrics record.

        Raises:
            StopIteration: The data ran out before the step's micro-batches were drawn.
        """
        cfg = self.config
        start = time.perf_counter()
        micro = [self._to_device(next(self._batches)) for _ in range(cfg.grad_accum_steps)]
        lr = {f"lr/{g['part']}": float(g["lr"]) for g in self.optimizer.param_groups}
        self.optimizer.zero_grad(set_to_none=True)
        total, aux_total = self.accumulate(micro)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
        norm: Any = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        finite = check_finite_loss(total) and check_finite_loss(aux_total) and check_finite_loss(norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # A skipped step still advances the schedule (it counts as a step); torch warns about that.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.scheduler.step()
        self.step += 1
        tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in micro)
        elapsed = time.perf_counter() - start
        record: dict[str, Any] = {
            "step": self.step,
            "loss": float(total),
            **lr,
            "grad_norm": float(norm),
            "tokens": tokens,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "skipped": not finite,
        }
        if self.loss.uses_moe:
            record["moe_aux_loss"] = float(aux_total)
        return record

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, Any]] | None = None) -> float:
        """Mean per-token next-token loss over ``batches`` (default: ``eval_batches``)."""
        batches = self.eval_batches if batches is None else batches
        if batches is None:
            raise ValueError("evaluate() needs batches: pass them or give the Trainer eval_batches")
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        for raw in batches:
            batch = self._to_device(raw)
            y = shift_labels(batch["labels"])
            total += self.micro_batch_loss(batch, y, 1.0)[0].double().cpu()
            count += float((y != IGNORE_INDEX).sum())
        self.model.train(was_training)
        return float(_all_reduce_sum(total) / _all_reduce_sum(count).clamp_min(1.0))

    def train(self) -> TrainResult:
        """Run until ``max_steps`` (or the data ends, a callback stops it, or losses stay non-finite)."""
        cfg = self.config
        self.model.train()
        metrics: MetricsLogger | RankMetrics = (
            MetricsLogger(
                self.output_dir,
                total_steps=cfg.max_steps,
                tensorboard=cfg.tensorboard,
                progress=cfg.progress,
                history=self.history,
            )
            if is_main_process()
            else RankMetrics(self.history)
        )
        self.history = metrics.records
        reason, guard, plot = "max_steps", NonFiniteGuard(cfg.max_nan_steps), None
        try:
            while self.step < cfg.max_steps:
                try:
                    record = self.train_step()
                except StopIteration:
                    reason = "data_exhausted"
                    break
                metrics.log(record)
                stop = guard.update(self.step, record)
                if stop is not None:
                    reason = stop
                    break
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                if any([bool(cb(self, record)) for cb in self.callbacks]):
                    reason = "callback"
                    break
            saved = self.last_checkpoint is not None and self.last_checkpoint.name == f"checkpoint-{self.step:08d}"
            if not reason.startswith("non-finite") and self.step > 0 and not saved:
                self.save()
        finally:
            plot = metrics.close(plot=cfg.plot)
        eval_loss = self.evaluate() if self.eval_batches is not None else None
        return TrainResult(
            steps=self.step,
            losses=[float(r["loss"]) for r in self.history],
            stopped_reason=reason,
            output_dir=self.output_dir,
            skipped_steps=sum(bool(r.get("skipped")) for r in self.history),
            checkpoint=self.last_checkpoint,
            eval_loss=eval_loss,
            plot=plot,
            records=list(self.history),
        )
