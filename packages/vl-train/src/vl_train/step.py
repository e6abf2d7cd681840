"""The loss of one micro-batch in a training step: next-token loss on labelled positions + MoE balance loss.

For a micro-batch ``m`` of the step's ``A`` micro-batches on rank ``r`` of ``W``:

- targets ``y_t = labels_{t+1}`` (:func:`shift_labels`; the shift happens here, ``lm_loss`` never shifts);
- ``loss_m = lm_loss(h_m, W_head, y_m, normalizer=Z)`` with the step's global normaliser ``Z``, so
  ``sum_{m, r} loss_m`` is the loss of the whole global batch;
- the MoE load-balancing loss (REFERENCE.md section 3, Switch style ``E sum_e f_e P_e``, coefficient
  ``c``), with the expert frequencies ``f`` either

  - ``global_batch_balance=True`` (arXiv 2501.11873): counted over all ``A`` micro-batches and all ``W``
    ranks before any loss (:class:`vl_moe.MoEBalanceTracker`; with ``A > 1`` a gradient-free routing
    pass over the step's micro-batches fills it first, one extra forward each). Each micro-batch
    contributes its token share, so ``sum_{m, r} aux_m = c * L_balance(global batch)`` exactly;
  - ``False``: each micro-batch's own ``f`` (transformers' behaviour), ``aux_m = c * L_balance(m) / A``.

Notation: ``A`` micro-batches per step, ``W`` ranks, ``Z`` global normaliser, ``W_head`` the LM head weight,
``E`` experts, ``c`` the model config's ``router_aux_loss_coef`` (:meth:`vl_model.TrainableVLM.moe_routing`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vl_moe import MoEBalanceTracker

from .config import TrainConfig
from .context_parallel import context_parallel_of
from .losses import IGNORE_INDEX, lm_loss, moe_aux_loss, track_moe_routing
from .parallel import root_forward

__all__ = ["MODEL_INPUTS", "StepLoss", "shift_labels"]

MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "pixel_values",
    "pixel_values_videos",
    "image_grid_thw",
    "video_grid_thw",
    "mm_token_type_ids",
    "segment_ids",
)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with positions: ``y[:, t] = labels[:, t + 1]``, the last position unscored.

    Padding the targets (instead of slicing the hidden states) keeps ``h`` contiguous: no copy of it.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, L], got shape {tuple(labels.shape)}")
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


class StepLoss:
    """Computes ``(lm_loss, moe_aux_loss or None)`` per micro-batch for a model and a config.

    Args:
        model: The (possibly FSDP-sharded) :class:`vl_model.TrainableVLM`.
        forward: ``model.forward_hidden`` or its compiled version (gives ``last_hidden_state`` and
            ``router_logits``).
        config: The run's settings (``loss_reduction``, ``loss_chunk_size``, ``global_batch_balance``,
            ``grad_accum_steps``).
        autocast: Returns the autocast context of the run (bf16 or none).
    """

    def __init__(
        self,
        model: nn.Module,
        forward: Callable[..., Any],
        config: TrainConfig,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.model, self.forward, self.config, self.autocast = model, forward, config, autocast
        routing = model.moe_routing()  # type: ignore[operator]
        self.num_experts = routing.num_experts if routing is not None else 0
        self.top_k = routing.top_k if routing is not None else 0
        self.aux_coef = routing.aux_coef if routing is not None else 0.0
        self.tracker: MoEBalanceTracker | None = None
        # context parallelism: each rank's forward returns its part of the rows (vl_train.context_parallel)
        self.context = context_parallel_of(model)

    @property
    def context_parallel(self) -> int:
        """``C``: the ranks one row's sequence is split over (1 without context parallelism)."""
        return self.context.size if self.context is not None else 1

    def _local_mask(self, batch: dict[str, Any]) -> torch.Tensor | None:
        mask = batch.get("attention_mask")
        return self.context.local(mask) if self.context is not None else mask

    @property
    def uses_moe(self) -> bool:
        """Whether the model is MoE and the balance loss is on (``router_aux_loss_coef > 0``)."""
        return self.top_k > 0 and self.aux_coef > 0

    @property
    def global_balance(self) -> bool:
        """Whether the balance loss takes its expert counts over the global batch."""
        return self.uses_moe and self.config.global_batch_balance

    def _tracker(self, num_layers: int) -> MoEBalanceTracker:
        if self.tracker is None or self.tracker.num_layers != num_layers:
            self.tracker = MoEBalanceTracker(self.num_experts, self.top_k, num_layers=num_layers)
        return self.tracker

    @torch.no_grad()
    def count_routing(self, micro: Sequence[dict[str, Any]]) -> None:
        """Start a step: reset the expert counts and add every micro-batch's routing (gradient-free forwards).

        Only needed for ``global_batch_balance`` with several micro-batches; a collective when distributed
        (every rank runs its forwards, the counts are all-reduced at the first loss).
        """
        for i, batch in enumerate(micro):
            if self.context is not None:
                batch, _ = self.context.pad(batch, batch["input_ids"])
            inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}

            def routing(inputs: dict[str, Any] = inputs) -> list[torch.Tensor]:
                with self.autocast():
                    return list(self.forward(**inputs, output_router_logits=True).router_logits)

            logits = root_forward(self.model, routing)
            tracker = self._tracker(len(logits))
            if i == 0:
                tracker.reset()
            track_moe_routing(tracker, logits, self._local_mask(batch))

    def __call__(
        self, batch: dict[str, Any], targets: torch.Tensor, normalizer: torch.Tensor | float, *, counted: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(lm_loss, moe_aux_loss or None)`` of one micro-batch with the step's normaliser.

        Args:
            batch: The micro-batch (model inputs, ``segment_ids`` for packed rows).
            targets: Shifted labels ``[B, L]`` (:func:`shift_labels`).
            normalizer: The step's global normaliser ``Z`` (1.0 for a plain sum).
            counted: The step's routing is already in the tracker (:meth:`count_routing`); otherwise, with
                global balancing, this micro-batch's own routing is counted first (the whole step when ``A = 1``).
        """
        cfg = self.config
        use_moe = self.uses_moe
        context = self.context
        segment_ids = batch.get("segment_ids")
        layout = None
        if context is not None:  # this rank scores its part, each token weighted by its whole sample
            batch, targets = context.pad(batch, targets)
            segment_ids = batch.get("segment_ids")
            layout = context.layout(targets, segment_ids)
            targets, segment_ids = targets[:, slice(*context.bounds(targets.shape[1]))], None
        inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}

        def forward_and_loss() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
            # Runs as the FSDP root's forward: the output weight is only gathered in there.
            weight = self.model.output_weight()  # type: ignore[operator]  # per call: FSDP swaps parameters
            with self.autocast():
                out = self.forward(**inputs, output_router_logits=use_moe)
                loss = lm_loss(
                    out.last_hidden_state,
                    weight,
                    targets,
                    segment_ids=segment_ids,
                    reduction=cfg.loss_reduction,
                    chunk_size=cfg.loss_chunk_size,
                    normalizer=normalizer,
                    layout=layout,
                ).loss
            return loss, (list(out.router_logits) if use_moe and out.router_logits else None)

        loss, router_logits = root_forward(self.model, forward_and_loss)
        if not router_logits:
            return loss, None
        mask = self._local_mask(batch)
        with self.autocast():
            if not self.global_balance:
                aux = moe_aux_loss(router_logits, mask, self.top_k, coef=self.aux_coef)
                return loss, aux / cfg.grad_accum_steps
            tracker = self._tracker(len(router_logits))
            if not counted:
                tracker.reset()
                track_moe_routing(tracker, router_logits, mask)
            aux = moe_aux_loss(router_logits, mask, self.top_k, tracker=tracker, coef=self.aux_coef)
        return loss, aux
