"""Attention plumbing of the decoder: an eager reference path and the masks of packed rows.

Packed rows (several samples in one row, as in Qwen3-VL training, arXiv 2511.21631 section 3) must not
attend across samples. At a prefill or without a cache (training, scoring) SDPA runs causal attention
on each sample's span (:func:`packed_sdpa_attention`): no ``[L, L]`` mask, and none of the cross-sample
scores a dense mask would compute and discard (at 32K tokens of 1K samples: a 1 GiB mask and 32x the
attention work). Eager attention (which returns probabilities) and compiled graphs get a boolean
block-causal mask built in one broadcast (:func:`packed_causal_mask`); decoding steps after a prefill get
a mask function for ``create_causal_mask``. FlashAttention gets varlen ``cu_seqlens`` (it takes no mask).
Rows packed without segment ids, by positions that restart at every sample (transformers'
``DataCollatorWithFlattening``, TRL's ``padding_free``), get their segment ids from the restarts
(:func:`segments_from_positions`, transformers' rule) and then the same masks.

Notation: ``B`` batch, ``L`` queries, ``S`` keys, ``Nq``/``Nk`` query/key-value heads, ``D`` head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "eager_attention",
    "flash_varlen_kwargs",
    "packed_causal_mask",
    "packed_sdpa_attention",
    "segment_mask_function",
    "segment_spans",
    "segments_from_positions",
]


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention (float32 softmax), ``[B, Nq, L, D] -> [B, L, Nq, D]``; for debugging."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., : key.shape[-2]], torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def segment_mask_function(segment_ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    """An ``and_mask_function`` for ``create_causal_mask``: tokens see only their own packed sample."""

    def same_segment(batch_idx: torch.Tensor, head_idx: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> Any:
        return segment_ids[batch_idx, q_idx] == segment_ids[batch_idx, kv_idx]

    return same_segment


def packed_causal_mask(segment_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean ``[B, 1, L, L]`` mask of packed rows: causal, within one segment, never onto padding keys.

    The same mask as ``create_causal_mask`` with :func:`segment_mask_function` for the real tokens, but
    built by one broadcast instead of ``vmap`` over a mask function (which showed up in CPU profiles
    of small-model training steps). A query at padding (``attention_mask`` 0) sees only itself, so no
    row is fully masked (SDPA would return NaN there, and NaN gradients poison the step even though
    padding carries no loss).

    Args:
        segment_ids: ``[B, L]`` sample index of each token within its row.
        attention_mask: ``[B, L]``, 0 at padding (``None``: no padding).
    """
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :]).tril_()  # in place: one [B, L, L] at the peak
    if attention_mask is not None:
        mask &= attention_mask[:, None, :].bool()
        mask.diagonal(dim1=-2, dim2=-1).fill_(True)
    return mask[:, None]


def _run_starts(segment_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L]`` True where a run of equal segment id (and, given a mask, padding flag) starts."""
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    if attention_mask is not None:
        start[:, 1:] |= attention_mask[:, 1:] != attention_mask[:, :-1]
    return start


def segment_spans(segment_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[list[tuple[int, int]]]:
    """``(start, stop)`` of every run of equal segment id (and padding flag), per row of ``[B, L]`` (one host sync).

    A run of padding (``attention_mask`` 0) is a span of its own, as in FlashAttention's varlen path: no
    real token attends to it, and its outputs are ignored.
    """
    length = segment_ids.shape[1]
    spans = []
    for starts in (row.nonzero().squeeze(-1).tolist() for row in _run_starts(segment_ids, attention_mask)):
        spans.append(list(zip(starts, [*starts[1:], length], strict=True)))
    return spans


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    segment_spans: list[list[tuple[int, int]]] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal SDPA within each packed sample: ``[B, Nq, L, D]`` queries -> ``[B, L, Nq, D]``, no probabilities.

    The attention-function contract of transformers (``attention_mask`` must be None: the spans replace it).

    Args:
        segment_spans: Per row, the ``(start, stop)`` of its samples (:func:`segment_spans`); they tile the row.
    """
    if segment_spans is None or attention_mask is not None:
        raise ValueError("packed_sdpa_attention takes segment_spans instead of an attention mask")
    rows = []
    for b, spans in enumerate(segment_spans):
        parts = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, start:stop],
                key[b : b + 1, :, start:stop],
                value[b : b + 1, :, start:stop],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=True,  # grouped KV heads read in place, not repeated for the whole row
            )
            for start, stop in spans
        ]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def flash_varlen_kwargs(segment_ids: torch.Tensor) -> dict[str, Any]:
    """FlashAttention varlen arguments (``cu_seq_lens_q/k``, ``max_length_q/k``) for packed ``[B, L]`` rows.

    Every run of equal segment id within a row is one sequence of the flattened ``B * L`` tokens
    (padding runs become sequences of their own, whose outputs are ignored).
    """
    batch, length = segment_ids.shape
    starts = _run_starts(segment_ids).reshape(-1).nonzero().squeeze(-1)
    cu = torch.cat([starts, starts.new_tensor([batch * length])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def segments_from_positions(position_ids: torch.Tensor, batch: int) -> torch.Tensor | None:
    """``[B, L]`` sample ids of rows packed by restarting positions, or None when no row restarts.

    A sample starts wherever a position is not its predecessor plus one, the rule transformers applies
    to padding-free inputs (``find_packed_sequence_indices``). Eager runs return None for unpacked
    rows (one host sync) so that they keep the plain causal mask; a compiled graph always gets the ids.

    Args:
        position_ids: ``[B, L]`` (or ``[1, L]``) text positions.
        batch: ``B``.
    """
    positions = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    step = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1)
    segments = (step != 1).cumsum(-1)
    if not torch.compiler.is_compiling() and not bool(segments[:, -1].any()):
        return None
    return segments
