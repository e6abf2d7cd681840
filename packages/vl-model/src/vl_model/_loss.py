"""Next-token cross-entropy of the VLM head, from full logits or from the labelled positions only.

Both follow transformers' ``ForCausalLMLoss``: targets are ``labels`` shifted left by one (the last
position unscored) unless ``shift_labels`` gives them already aligned with the positions (as
transformers' ``Trainer`` and TRL do under context parallelism); ``-100`` is ignored; the summed loss
is divided by ``num_items_in_batch`` when given (gradient accumulation), else by the local count of
scored tokens. One difference: with no scored token the loss is 0, not transformers' NaN.

:func:`labelled_loss` projects only the scored positions onto the vocabulary (the largest matmul of a
training step), so ``[B, L, V]`` logits never exist; vl-train's trainer takes that path.

Notation: ``B`` batch, ``L`` sequence, ``H`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "labelled_loss", "targets_of"]

IGNORE_INDEX = -100


def targets_of(labels: torch.Tensor | None, shift_labels: torch.Tensor | None) -> torch.Tensor:
    """``[B, L]`` targets aligned with positions: ``shift_labels``, or ``labels`` shifted left by one."""
    if shift_labels is not None:
        return shift_labels
    if labels is None:
        raise ValueError("the loss needs labels or shift_labels")
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _normalise(
    total: torch.Tensor, scored: torch.Tensor, num_items_in_batch: torch.Tensor | int | None
) -> torch.Tensor:
    denom: torch.Tensor | int = scored.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return total / denom


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Loss from full logits ``[B, L, V]`` (float32 cross-entropy, no host sync)."""
    targets = targets_of(labels, shift_labels).to(logits.device)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not match the logits' positions {tuple(logits.shape[:-1])}"
        )
    flat = targets.reshape(-1)
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), flat, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return _normalise(total, (flat != IGNORE_INDEX).sum(), num_items_in_batch)


def labelled_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor | None,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Loss from hidden states ``[B, L, H]``, projecting only the scored positions through ``head``."""
    targets = targets_of(labels, shift_labels).to(hidden.device)
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not match the hidden states' positions "
            f"{tuple(hidden.shape[:-1])}"
        )
    keep = targets != IGNORE_INDEX
    logits = head(hidden[keep]).float()
    total = F.cross_entropy(logits, targets[keep], reduction="sum")
    return _normalise(total, keep.sum(), num_items_in_batch)
