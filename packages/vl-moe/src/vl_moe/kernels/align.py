"""Token alignment for the grouped MoE GEMMs: sort (token, slot) pairs by expert, pad per expert.

:func:`align_tokens` runs the Triton counting sort of :mod:`vl_moe.kernels._align_kernels`
(the block-padded layout of vLLM's ``moe_align_block_size``; deterministic, no atomics) and
returns an :class:`Alignment`. Row ``r`` of the sorted layout holds pair ``sorted_ids[r]``
(``pair = token * k + slot``) or the sentinel ``P`` on a padding row; row block ``b``
(``BLOCK_M`` rows) belongs to expert ``block_expert[b]`` (-1: unused block). Buffers are sized
for the worst case, ``P + min(E, P) * (BLOCK_M - 1)`` rows, so no host synchronisation is needed
to launch the GEMMs.

Notation: ``T`` tokens, ``k`` slots per token, ``P = T * k`` pairs, ``E`` experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

__all__ = ["Alignment", "align_tokens", "check_topk_ids"]

_ONEHOT = 16384  # elements of the [CHUNK, E_BLOCK] one-hot tile of a histogram/scatter program
_BLOCK_C = 32  # chunks per step of the offsets program
_BLOCK_B = 128  # row blocks per step of the owner search


@dataclass(frozen=True)
class Alignment:
    """Expert-sorted, block-padded layout of the routed pairs.

    Attributes:
        sorted_ids: ``[num_blocks * block_m]`` int64 pair index per sorted row (``num_pairs`` on padding rows).
        block_expert: ``[num_blocks]`` int32 expert of each row block, -1 for blocks past the last run.
        expert_offsets: ``[E + 1]`` int64 padded run boundaries: expert ``e`` owns rows
            ``expert_offsets[e]:expert_offsets[e + 1]`` (an empty run for an expert with no tokens).
        num_pairs: ``P = T * k``.
        top_k: ``k``.
        block_m: Rows per block (the padding unit).
    """

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    expert_offsets: torch.Tensor
    num_pairs: int
    top_k: int
    block_m: int

    @property
    def num_blocks(self) -> int:
        """Row blocks allocated (the grid size of the row-block kernels)."""
        return self.block_expert.numel()


def _kernels() -> ModuleType:
    from vl_moe.kernels import _align_kernels

    return _align_kernels


def check_topk_ids(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Raise :class:`ValueError` unless ``topk_ids`` is a 2-D integer tensor with ids in ``[0, num_experts)``."""
    if topk_ids.ndim != 2:
        raise ValueError(f"topk_ids must be 2-D [T, k], got {topk_ids.ndim}-D with shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor, got dtype {topk_ids.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if topk_ids.numel():
        bounds = torch.aminmax(topk_ids)
        low, high = int(bounds.min), int(bounds.max)  # one host synchronisation
        if low < 0 or high >= num_experts:
            bad = low if low < 0 else high
            raise ValueError(
                f"topk_ids holds expert id {bad}, outside [0, {num_experts}) for num_experts={num_experts}"
            )


def align_tokens(topk_ids: torch.Tensor, num_experts: int, block_m: int, *, validate: bool = True) -> Alignment:
    """Sort the ``T * k`` routed pairs by expert (stable) and pad each expert's run to ``block_m`` rows.

    Args:
        topk_ids: ``[T, k]`` integer expert id of each (token, slot).
        num_experts: ``E``.
        block_m: Padding unit (rows per GEMM tile), a power of two.
        validate: Check the ids are in range (one host synchronisation); skip only for trusted ids.

    Returns:
        The :class:`Alignment` (on ``topk_ids.device``).

    Raises:
        ValueError: On a non 2-D or non-integer ``topk_ids``, an id outside ``[0, E)``, a bad ``block_m``,
            or CPU ids without Triton's interpreter.
    """
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a positive power of two, got {block_m}")
    kern = _kernels()
    from vl_moe.kernels import _common

    device = _common.check_device("align_tokens", topk_ids)
    if validate:
        check_topk_ids(topk_ids, num_experts)
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    ids = topk_ids.reshape(-1).contiguous()
    max_rows = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    num_blocks = max(1, -(-max_rows // block_m))
    e_block = max(2, 1 << (num_experts - 1).bit_length())
    chunk = max(16, min(256, _ONEHOT // e_block))
    num_chunks = max(1, -(-num_pairs // chunk))
    opts = {} if device.type == "cpu" else {"num_warps": 8}

    counts = torch.empty(num_chunks, e_block, dtype=torch.int32, device=device)
    bases = torch.empty(num_chunks, e_block, dtype=torch.int64, device=device)
    expert_offsets = torch.empty(num_experts + 1, dtype=torch.int64, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    sorted_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int64, device=device)

    with _common.on_device(device):
        kern.histogram_kernel[(num_chunks,)](ids, counts, num_pairs, CHUNK=chunk, E_BLOCK=e_block, **opts)
        kern.offsets_kernel[(1,)](
            counts, bases, expert_offsets, block_expert, num_chunks, num_experts, num_blocks,
            BLOCK_M=block_m, E_BLOCK=e_block, BLOCK_C=_BLOCK_C, BLOCK_B=_BLOCK_B, **opts,
        )  # fmt: skip
        if num_pairs:
            kern.scatter_kernel[(num_chunks,)](ids, bases, sorted_ids, num_pairs, CHUNK=chunk, E_BLOCK=e_block, **opts)
    return Alignment(sorted_ids, block_expert, expert_offsets, num_pairs, top_k, block_m)
