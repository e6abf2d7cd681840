"""The training loop: gradient accumulation with a global loss normaliser, AdamW, clipping, checkpoints.

One optimiser step (REFERENCE.md section 4; the loss is :func:`vl_train.losses.lm_loss`):

1. draw ``A = grad_accum_steps`` micro-batches; compute the normaliser ``Z`` of the chosen reduction
   over all of them and over every data-parallel rank (:func:`~vl_train.losses.global_loss_normalizer`);
2. for each micro-batch: hidden states ``h = model.forward_hidden(...)``, targets ``y_t = labels_{t+1}`` (the
   shift happens here), ``loss_m = lm_loss(h, W_head, y, normalizer=Z)`` plus the MoE balance loss, its
   expert counts global over the step by default (:class:`vl_train.step.StepLoss`); back-propagate
   ``W x loss_m`` (``W`` ranks: DDP/FSDP average gradients, the global ``Z`` wants sums);
3. if any ``loss_m`` or the gradient norm is not finite, the step is skipped (gradients dropped,
   weights and optimiser state untouched) and logged; ``max_nan_steps`` consecutive ones stop the run;
4. otherwise clip the gradient norm, step AdamW, step the warm-up + cosine schedule.

``sum_m loss_m`` is then the loss of the whole global batch and its gradient that of one big batch.

Everything around the step (freezing, the optimiser and schedule, FSDP2 on ``W > 1`` ranks, checkpoints
and exact resume, metrics, callbacks, the non-finite guard) is :class:`vl_train.loop.TrainingLoop`'s;
under FSDP each micro-batch's forward and loss run through :func:`~vl_train.parallel.root_forward`.

Notation: ``A`` micro-batches per step, ``W`` world size, ``Z`` global normaliser, ``W_head`` the LM head.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .loop import Callback, OutputDirError, TrainingLoop, TrainResult, check_output_dir, iterate
from .losses import IGNORE_INDEX, global_loss_normalizer, loss_normalizer
from .parallel import sum_over_ranks, world_size
from .step import MODEL_INPUTS, StepLoss, shift_labels

__all__ = ["MODEL_INPUTS", "OutputDirError", "TrainResult", "Trainer", "check_output_dir", "shift_labels"]


class Trainer(TrainingLoop):
    """Trains a VLM on labelled batches with a :class:`~vl_train.config.TrainConfig`.

    Args:
        model: A :class:`vl_model.TrainableVLM` (``VLForConditionalGeneration`` or a composed model).
            Parts outside ``config.trainable`` are frozen here.
        config: The run's settings.
        train_batches: Batches (dicts with ``input_ids``, ``labels`` and optionally ``attention_mask``,
            ``segment_ids``, pixel inputs, ...), one micro-batch each. When the object has
            ``state_dict()`` / ``load_state_dict()`` (describing the batches drawn so far), its state
            is checkpointed and restored on resume, so the data continues where it stopped.
        eval_batches: Batches for a mean per-token loss at the end of the run.
        callbacks: ``callback(trainer, record)`` after every step (and its checkpoint); a truthy
            return value stops the run.
        resume: ``True``: continue from the latest valid checkpoint in ``config.output_dir`` (if any);
            a path: from that checkpoint (or the latest valid one inside that folder).
        overwrite: Start afresh in an output folder that holds another run (deleting its checkpoints and
            metrics); without it such a folder is an error.

    Raises:
        OutputDirError: ``config.output_dir`` cannot be written or holds another run (before any training).
    """

    config: TrainConfig

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_batches: Iterable[dict[str, Any]],
        *,
        eval_batches: Iterable[dict[str, Any]] | None = None,
        callbacks: Sequence[Callback] = (),
        resume: bool | str | os.PathLike[str] = False,
        overwrite: bool = False,
    ) -> None:
        self.data = train_batches
        self._batches = iterate(train_batches)
        self.eval_batches = eval_batches
        super().__init__(model, config, callbacks=callbacks, resume=resume, overwrite=overwrite)
        forward: Any = model.forward_hidden
        self.loss = StepLoss(model, torch.compile(forward) if config.compile else forward, config, self._autocast)

    # ------------------------------------------------------------------ TrainingLoop hooks

    def data_state(self) -> Any:
        """The data's ``state_dict()`` (``None`` when it has none)."""
        get = getattr(self.data, "state_dict", None)
        return get() if callable(get) else None

    def load_data_state(self, state: Any) -> None:
        """Continue the data where the checkpoint left it."""
        load = getattr(self.data, "load_state_dict", None)
        if not callable(load):
            return
        load(state)
        self._batches = iterate(self.data)

    def data_counts(self) -> dict[str, int]:
        """What the data pipeline rendered, skipped, dropped and truncated so far (empty when it does not count)."""
        stats = getattr(self.data, "stats", None)
        return {str(k): int(v) for k, v in sorted(stats.counts.items())} if stats is not None else {}

    def finish(self, result: TrainResult) -> TrainResult:
        """Adds the data counts and the evaluation loss on ``eval_batches``."""
        result.data_stats = self.data_counts()
        if self.eval_batches is not None:
            result.eval_loss = self.evaluate()
        return result

    # ------------------------------------------------------------------ the step

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
        # the C ranks of a context-parallel group hold the same rows: each adds 1/C of their normaliser
        share = self.loss.context_parallel
        z = global_loss_normalizer(
            [
                loss_normalizer(t, b.get("segment_ids"), cfg.loss_reduction) / share
                for t, b in zip(targets, micro, strict=True)
            ]
        )
        if not float(z) > 0:  # a loss of 0 would look like success: no token of the global batch is labelled
            ids = [i for b in micro for row in b.get("sample_ids", []) for i in row]
            named = f"samples {ids}" if ids else "its samples (batches without sample_ids)"
            raise ValueError(
                f"step {self.step + 1}: no labelled token in the global batch ({named}): every label is -100, so "
                "there is nothing to learn; check that the assistant turns hold answers and that the chat template "
                "marks them (vl_model.VLProcessor.render_conversation)"
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
        sum_over_ranks(total)
        sum_over_ranks(aux_total)
        if not self.loss.global_balance:
            aux_total /= world
        return total, aux_total

    def train_step(self) -> dict[str, Any]:
        """One optimiser step over ``grad_accum_steps`` micro-batches; returns its metrics record.

        Raises:
            StopIteration: The data ran out before the step's micro-batches were drawn.
        """
        start = time.perf_counter()
        micro = [self._to_device(next(self._batches)) for _ in range(self.config.grad_accum_steps)]
        lr = self.learning_rates()
        self.optimizer.zero_grad(set_to_none=True)
        total, aux_total = self.accumulate(micro)
        norm, stepped = self.optimizer_step(total, aux_total)
        tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in micro)
        elapsed = time.perf_counter() - start
        record: dict[str, Any] = {
            "loss": float(total),
            **lr,
            "grad_norm": norm,
            "tokens": tokens,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "skipped": not stepped,
        }
        if self.loss.uses_moe:
            record["moe_aux_loss"] = float(aux_total)
        record.update({f"data/{event}": count for event, count in self.data_counts().items()})
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
            count += float((y != IGNORE_INDEX).sum()) / self.loss.context_parallel  # a CP group shares its rows
        self.model.train(was_training)
        return float(sum_over_ranks(total) / sum_over_ranks(count).clamp_min(1.0))
