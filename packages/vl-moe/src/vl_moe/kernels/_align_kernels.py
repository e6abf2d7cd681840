"""Triton kernels of the token alignment: a deterministic two-pass counting sort (private).

The ``P = T * k`` (token, slot) pairs are sorted by expert, stably (pairs of one expert keep
their pair order), and each expert's run is padded up to a multiple of ``BLOCK_M`` rows so
that every ``BLOCK_M`` row block of the grouped GEMMs belongs to exactly one expert (the
block-padded layout of vLLM's ``moe_align_block_size``, written here as a counting sort with
no atomics, so the permutation is a pure function of the routing).

Three launches:

1. :func:`histogram_kernel`, one program per chunk of ``CHUNK`` pairs: per-expert counts of
   the chunk, ``counts[c, e]``.
2. :func:`offsets_kernel`, one program: expert totals, padded run starts (a prefix sum),
   each chunk's first destination per expert (a prefix sum over chunks, ``BLOCK_C`` chunks per
   step), and the expert owning each row block.
3. :func:`scatter_kernel`, one program per chunk: the rank of each pair among the same-expert
   pairs of its chunk (a cumulative sum over a one-hot tile) plus the chunk's base gives its
   destination row.

All positions are int64, so ``P`` and the padded row count may exceed ``2**31`` elements of
any buffer indexed with them.

Notation: ``P`` pairs, ``E`` experts (``E_BLOCK`` its next power of two), ``C`` chunks.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["histogram_kernel", "offsets_kernel", "scatter_kernel"]


@triton.jit
def histogram_kernel(  # type: ignore[no-untyped-def]
    ids_ptr,
    counts_ptr,
    num_pairs,
    CHUNK: tl.constexpr,
    E_BLOCK: tl.constexpr,
):
    """``counts[c, e]`` = number of pairs of chunk ``c`` routed to expert ``e`` (``counts`` is ``[C, E_BLOCK]``)."""
    c = tl.program_id(0).to(tl.int64)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
    experts = tl.arange(0, E_BLOCK)
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
    tl.store(counts_ptr + c * E_BLOCK + experts, tl.sum(onehot, axis=0))


@triton.jit
def offsets_kernel(  # type: ignore[no-untyped-def]
    counts_ptr,
    bases_ptr,
    expert_offsets_ptr,
    block_expert_ptr,
    num_chunks,
    num_experts,
    num_blocks,
    BLOCK_M: tl.constexpr,
    E_BLOCK: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Padded expert runs (``expert_offsets [E+1]``), chunk bases ``[C, E_BLOCK]`` and ``block_expert [num_blocks]``.

    Chunks are read ``BLOCK_C`` at a time (a ``[BLOCK_C, E_BLOCK]`` tile), so the sequential part is
    ``C / BLOCK_C`` steps. ``block_expert[b]`` is the expert whose padded run holds rows
    ``b*BLOCK_M ..``, or -1 for a block past the last run (the GEMM grids are sized for the worst case).
    """
    experts = tl.arange(0, E_BLOCK)
    totals = tl.zeros([E_BLOCK], dtype=tl.int64)
    for c0 in range(0, num_chunks, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        tile_ptrs = counts_ptr + chunks[:, None] * E_BLOCK + experts[None, :]
        tile = tl.load(tile_ptrs, mask=(chunks < num_chunks)[:, None], other=0).to(tl.int64)
        totals += tl.sum(tile, axis=0)
    padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    tl.store(expert_offsets_ptr + 1 + experts, ends, mask=experts < num_experts)
    tl.store(expert_offsets_ptr + experts, starts, mask=experts == 0)

    running = starts
    for c0 in range(0, num_chunks, BLOCK_C):
        chunks = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        in_range = (chunks < num_chunks)[:, None]
        offs = chunks[:, None] * E_BLOCK + experts[None, :]
        tile = tl.load(counts_ptr + offs, mask=in_range, other=0).to(tl.int64)
        before = tl.cumsum(tile, axis=0) - tile  # pairs of earlier chunks of this tile, per expert
        tl.store(bases_ptr + offs, running[None, :] + before, mask=in_range)
        running += tl.sum(tile, axis=0)

    for b0 in range(0, num_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        first_row = blocks.to(tl.int64) * BLOCK_M
        # Runs are contiguous and ordered by expert: the owner is the number of runs ending at or before the row.
        owner = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        owner = tl.where(owner >= num_experts, -1, owner)
        tl.store(block_expert_ptr + blocks, owner, mask=blocks < num_blocks)


@triton.jit
def scatter_kernel(  # type: ignore[no-untyped-def]
    ids_ptr,
    bases_ptr,
    sorted_ids_ptr,
    num_pairs,
    CHUNK: tl.constexpr,
    E_BLOCK: tl.constexpr,
):
    """Write each pair index of chunk ``c`` to its sorted row: chunk base of its expert + rank in the chunk."""
    c = tl.program_id(0).to(tl.int64)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    valid = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=valid, other=-1).to(tl.int32)
    onehot = (ids[:, None] == tl.arange(0, E_BLOCK)[None, :]).to(tl.int32)
    inclusive = tl.cumsum(onehot, axis=0)
    rank = tl.sum(onehot * inclusive, axis=1) - 1
    base = tl.load(bases_ptr + c * E_BLOCK + ids, mask=valid, other=0)
    tl.store(sorted_ids_ptr + base + rank.to(tl.int64), offs, mask=valid)
