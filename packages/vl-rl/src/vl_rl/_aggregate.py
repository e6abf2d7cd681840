"""Loss aggregation over tokens.

Aggregations (REFERENCE.md section 5; the names follow the RL papers' usage):

    SEQ-MEAN   (GRPO, GSPO, SAPO): mean over non-empty sequences of each one's token mean.
    TOKEN-MEAN (DAPO, CISPO):      sum over all unmasked tokens / their number.
    CONST      (Dr. GRPO):          sum over all unmasked tokens / (B * C), C a fixed constant
                                    (the maximum generation length), independent of the data.

Each aggregation is a weighted sum ``sum_{b,t} W[b,t] * l[b,t]`` with weights that are zero at
masked positions, so the per-token losses and their gradients can be computed once, in closed
form, and combined with the same ``W``. Sequences without any unmasked token are left out of the
SEQ-MEAN denominator (as verl's ``seq-mean-token-mean``): padding rows in a micro-batch do not
dilute the loss. All-masked input gives a loss of exactly 0.

Notation: B sequences, T positions, m [B, T] the boolean loss mask, n_b = sum_t m[b, t].
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["Aggregation", "aggregate", "row_weights"]

Aggregation = Literal["seq_mean", "token_mean", "const"]
AGGREGATIONS: tuple[str, ...] = ("seq_mean", "token_mean", "const")


def row_weights(
    n_tok: torch.Tensor, aggregation: Aggregation, *, seq_len: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Per-row factor ``w [B, 1]`` with ``W = mask * w`` the aggregation weights.

    Args:
        n_tok: ``[B]`` unmasked tokens per row, floating.
        aggregation: ``"seq_mean"``, ``"token_mean"`` or ``"const"``.
        seq_len: T, the default C of ``"const"``.
        max_tokens: the constant C of ``"const"``; defaults to ``seq_len``.

    Returns:
        ``[B, 1]`` weights in ``n_tok``'s dtype.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    n = n_tok[:, None]
    if aggregation == "token_mean":
        return (1.0 / n.sum().clamp(min=1.0)).expand_as(n)
    if aggregation == "const":
        c = seq_len if max_tokens is None else max_tokens
        if c <= 0:
            raise ValueError(f"max_tokens must be positive, got {c}")
        return torch.full_like(n, 1.0 / (max(n.shape[0], 1) * c))
    n_seq = (n > 0).sum().clamp(min=1).to(n.dtype)
    return 1.0 / (n.clamp(min=1.0) * n_seq)


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Aggregation = "token_mean",
    *,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Differentiable aggregation of any per-token quantity (an entropy bonus, a KL term).

    Masked positions are selected away with ``where`` before weighting, so NaN or garbage there
    never reaches the result or its gradient.

    Args:
        values: ``[B, T]`` per-token values.
        mask: ``[B, T]`` loss mask (nonzero = counted).
        aggregation: ``"seq_mean"``, ``"token_mean"`` or ``"const"``.
        max_tokens: the constant C of ``"const"``; defaults to T.

    Returns:
        A scalar in ``values``' dtype promoted to at least float32.
    """
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    m = mask if mask.dtype == torch.bool else mask != 0
    dtype = torch.promote_types(values.dtype, torch.float32)
    mask_f = m.to(dtype)
    w = row_weights(mask_f.sum(dim=1), aggregation, seq_len=m.shape[1], max_tokens=max_tokens)
    return (torch.where(m, values.to(dtype), 0.0) * mask_f * w).sum()
