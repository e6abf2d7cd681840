"""Tile sizes of the Triton MoE kernels, picked by a small heuristic (no autotuning).

The grouped GEMMs tile the expert-sorted rows in ``BLOCK_M`` row blocks (the alignment pads
each expert's run to a multiple of ``BLOCK_M``), so ``BLOCK_M`` follows the expected rows per
expert: decode and small batches use 16-row blocks (little padding waste), large batches use
64-row blocks (more reuse of each weight tile). ``BLOCK_N``/``BLOCK_K`` are Hopper-sized on
CUDA and small under Triton's CPU interpreter, where every program is run in Python and
fewer, larger tiles only cost masked work. The config is fixed per call, so results are
bitwise reproducible: no autotuner picks a different reduction order between runs.

Notation: ``P`` (token, slot) pairs, ``E`` experts.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KernelConfig", "fit", "pick_config"]


@dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """Tile sizes and launch options shared by all MoE kernels of one call.

    Attributes:
        block_m: Rows (expert-sorted pairs) per tile; the alignment padding unit. Power of two >= 16.
        block_n: Output columns per tile (capped at the next power of two of the output width).
        block_k: Reduction step (capped at the next power of two of the reduction width).
        num_warps: Warps per program on CUDA.
        num_stages: Software-pipelining stages on CUDA.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (the smallest tl.dot tile), got {value}")


def pick_config(num_pairs: int, num_experts: int, *, interpret: bool) -> KernelConfig:
    """Choose tile sizes from the average rows per expert.

    Args:
        num_pairs: ``P = T * k`` routed (token, slot) pairs.
        num_experts: ``E``.
        interpret: Whether the kernels run in Triton's CPU interpreter.

    Returns:
        The config for every kernel of this forward and its backward.
    """
    if interpret:
        return KernelConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1)
    rows_per_expert = num_pairs / max(num_experts, 1)
    if rows_per_expert <= 16:
        return KernelConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    if rows_per_expert <= 64:
        return KernelConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4)
    return KernelConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


def fit(block: int, width: int) -> int:
    """``block`` capped at the next power of two >= ``width``, and at least 16 (the smallest ``tl.dot`` side)."""
    return max(16, min(block, 1 << max(width - 1, 0).bit_length()))
