"""Greedy first-fit packing of rendered samples into fixed-length rows with per-sample segments.

Implements sequence packing for VLM training (used for Qwen3-VL's long-context stages, Qwen3-VL
technical report arXiv 2511.21631, section 3; REFERENCE.md section 4): samples are placed, in
order, into the first row with room for them (first-fit), rows are padded to ``max_length``, and
``segment_ids`` tell :class:`vl_model.VLForConditionalGeneration` where each sample starts so that
MRoPE positions restart per sample and attention stays inside each sample. Together with labels
that are ``-100`` at every sample's first token (the model shifts labels inside, so that position
would otherwise be predicted from the previous sample), the packed loss equals the sum of the
per-sample losses.

Notation: ``B`` rows per batch; ``L`` = ``max_length``; ``N`` patches; segment id ``k`` = the
``k``-th sample of a row, ``-1`` = padding (what ``vl_rope.get_rope_index`` reads as padding).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from .collate import concat_visuals
from .render import IGNORE_INDEX, RenderedSample

__all__ = ["PAD_SEGMENT", "first_fit", "iter_packed", "pack", "pack_rows"]

PAD_SEGMENT = -1
"""Segment id of padding positions."""


def first_fit(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Greedy first-fit bin packing: each item goes into the first row with room, else a new row.

    Args:
        lengths: Item lengths in order.
        max_length: Row capacity.

    Returns:
        Rows as lists of item indices (increasing within a row); every index appears once.

    Raises:
        ValueError: ``max_length < 1`` or an item longer than ``max_length`` (index and length named).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    rows: list[list[int]] = []
    room: list[int] = []
    for index, n in enumerate(lengths):
        if n > max_length or n < 1:
            raise ValueError(f"item {index} has length {n}; packing needs 1 <= length <= max_length ({max_length})")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(index)
                room[r] -= n
                break
        else:
            rows.append([index])
            room.append(max_length - n)
    return rows


def pack_rows(
    samples: Sequence[RenderedSample], rows: Sequence[Sequence[int]], max_length: int, *, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Lay out ``rows`` (lists of sample indices) as one packed batch.

    Args:
        samples: Rendered samples.
        rows: For each row, the indices of its samples in order.
        max_length: Row length ``L``.
        pad_token_id: Token id at padding positions.

    Returns:
        ``input_ids``, ``labels``, ``attention_mask``, ``segment_ids``, ``mm_token_type_ids`` (each
        ``[B, L]``) and the visual inputs concatenated in row-major sample order.

    Raises:
        ValueError: A row longer than ``max_length``.
    """
    batch = len(rows)
    input_ids = torch.full((batch, max_length), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, max_length), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((batch, max_length), PAD_SEGMENT, dtype=torch.long)
    types = torch.zeros(batch, max_length, dtype=torch.long)
    order: list[RenderedSample] = []
    for r, row in enumerate(rows):
        total = sum(len(samples[i]) for i in row)
        if total > max_length:
            raise ValueError(f"row {r} holds {total} tokens > max_length {max_length}")
        at = 0
        for k, i in enumerate(row):
            sample = samples[i]
            n = len(sample)
            input_ids[r, at : at + n] = sample.input_ids
            labels[r, at : at + n] = sample.labels
            labels[r, at] = IGNORE_INDEX  # never predict a sample's first token from the previous sample
            types[r, at : at + n] = sample.mm_token_type_ids
            segments[r, at : at + n] = k
            at += n
            order.append(sample)
    out = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": (segments != PAD_SEGMENT).long(),
        "segment_ids": segments,
        "mm_token_type_ids": types,
    }
    out.update(concat_visuals(order))
    return out


def pack(
    samples: Sequence[RenderedSample], max_length: int, *, pad_token_id: int, rows_per_batch: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """First-fit pack ``samples`` and split the rows into batches of ``rows_per_batch`` (all in one when None).

    Raises:
        ValueError: A sample longer than ``max_length`` (render with ``max_length`` first), or
            ``rows_per_batch < 1``.
    """
    if rows_per_batch is not None and rows_per_batch < 1:
        raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    rows = first_fit([len(s) for s in samples], max_length)
    step = rows_per_batch or max(len(rows), 1)
    return [
        pack_rows(samples, rows[i : i + step], max_length, pad_token_id=pad_token_id) for i in range(0, len(rows), step)
    ]


def iter_packed(
    samples: Iterable[RenderedSample],
    max_length: int,
    *,
    pad_token_id: int,
    rows_per_batch: int,
    buffer_size: int = 64,
) -> Iterator[dict[str, torch.Tensor]]:
    """Stream packed batches of exactly ``rows_per_batch`` rows (the last one may have fewer).

    Samples are gathered ``buffer_size`` at a time and first-fit packed; rows that do not fill a
    whole batch go back to the buffer, so nothing is lost and the order stays deterministic.

    Raises:
        ValueError: ``rows_per_batch`` or ``buffer_size`` < 1, or a sample longer than ``max_length``.
    """
    if rows_per_batch < 1 or buffer_size < 1:
        raise ValueError(f"rows_per_batch and buffer_size must be >= 1, got {rows_per_batch} and {buffer_size}")
    buffer: list[RenderedSample] = []

    def drain(final: bool) -> Iterator[dict[str, torch.Tensor]]:
        nonlocal buffer
        rows = first_fit([len(s) for s in buffer], max_length)
        full = len(rows) if final else len(rows) // rows_per_batch * rows_per_batch
        for i in range(0, full, rows_per_batch):
            yield pack_rows(buffer, rows[i : i + rows_per_batch], max_length, pad_token_id=pad_token_id)
        buffer = [buffer[j] for row in rows[full:] for j in row]

    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= buffer_size:
            yield from drain(final=False)
    if buffer:
        yield from drain(final=True)
