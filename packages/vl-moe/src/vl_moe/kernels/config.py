"""Tile sizes of the Triton MoE kernels: a tuned table where one exists, a rule otherwise (no autotuning).

The grouped GEMMs tile the expert-sorted rows in ``BLOCK_M`` row blocks (the alignment pads
each expert's run to a multiple of ``BLOCK_M``), so ``BLOCK_M`` follows the expected rows per
expert: 16-row blocks for small batches (little padding waste), 32 and 64 in between, 128 once
an expert gets 128 rows or more (the 30B-A3B layer from 2K tokens: each weight tile is then
reused by twice the rows of a 64-row block). Batches of at most :data:`DECODE_MAX_PAIRS` routed
pairs run inference on the two-launch decode path instead (``decode=True``). float32 inputs
(exact products on the CUDA cores) and widths that are no multiple of 16 (element-wise loads)
get narrower tiles, which keep them free of register spills. Under Triton's CPU interpreter
every program runs in Python, so the tiles are small there.

Where :mod:`vl_moe.kernels.table` holds a table tuned on the GPU at hand for the layer's shape
(written by ``python -m vl_moe.kernels.tune``, vLLM's approach), the entry tuned for the nearest
token count wins over the rule. The config is fixed per call, so results are bitwise
reproducible: no autotuner picks a different reduction order between runs.

Notation: ``P`` (token, slot) pairs, ``E`` experts, ``T`` tokens, ``k`` slots per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DECODE_MAX_PAIRS", "KernelConfig", "fit", "rule"]

DECODE_MAX_PAIRS = 64
"""Inference batches with at most this many routed pairs take the decode path (e.g. 8 tokens at top-8)."""


@dataclass(frozen=True, kw_only=True)
class KernelConfig:
    """Tile sizes and launch options shared by all MoE kernels of one call.

    Attributes:
        block_m: Rows (expert-sorted pairs) per tile; the alignment padding unit. Power of two >= 16.
        block_n: Output columns per tile of the row-block GEMMs (capped at the next power of two of the
            output width); the gate/up GEMM keeps two such accumulators. Also the GEMV tile of the decode path.
        block_k: Reduction step (capped at the next power of two of the reduction width).
        num_warps: Warps per program on CUDA.
        num_stages: Software-pipelining stages on CUDA.
        group_m: Row blocks per group of the grouped (L2-friendly) program order; 1 = column-tile fastest.
        block_dw: Output tile side of the weight-gradient kernels (default ``block_n``).
        decode: Run inference (no gradient wanted) on the two-launch decode path, without the alignment.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    block_dw: int | None = None
    decode: bool = False

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "block_dw"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(f"{name} must be a power of two >= 16 (the smallest tl.dot tile), got {value}")
        if self.group_m < 1:
            raise ValueError(f"group_m must be >= 1, got {self.group_m}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(
                f"num_warps must be 1, 2, 4, 8 or 16 and num_stages >= 1, got {self.num_warps} and {self.num_stages}"
            )

    @property
    def dw_tile(self) -> int:
        """The weight-gradient kernels' output tile side."""
        return self.block_n if self.block_dw is None else self.block_dw

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (the tuned tables' entry format)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, entry: dict[str, Any], *, where: str = "config") -> KernelConfig:
        """A config from :meth:`to_dict`'s format; :class:`ValueError` naming ``where`` on unknown or missing keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(entry) - names)
        if unknown:
            raise ValueError(f"{where}: unknown KernelConfig keys {unknown} (known: {sorted(names)})")
        try:
            return cls(**entry)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from err


def rule(num_pairs: int, num_experts: int, *, train: bool, dtype: torch.dtype | None, aligned: bool) -> KernelConfig:
    """The rule behind :func:`vl_moe.kernels.table.pick_config` (sizes checked spill-free for sm_90 and sm_100 by ``tests/gpu_compile``)."""
    rows_per_expert = num_pairs / max(num_experts, 1)
    if not train and num_pairs <= DECODE_MAX_PAIRS:
        return KernelConfig(block_m=16, block_n=16, block_k=256, num_warps=4, num_stages=3, decode=True)
    if rows_per_expert <= 16:
        cfg = KernelConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    elif rows_per_expert <= 64:
        cfg = KernelConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=4)
    elif rows_per_expert < 128:
        cfg = KernelConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)
    else:
        cfg = KernelConfig(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3, block_dw=128)
    if dtype == torch.float32:
        # Exact float32 products run on the CUDA cores (no tensor cores): large tiles only add registers
        # (128-row weight-gradient tiles spill kilobytes) and shared memory, for no reuse the FMAs can use.
        cfg = dataclasses.replace(
            cfg,
            block_m=min(cfg.block_m, 64),
            block_n=min(cfg.block_n, 64),
            block_k=min(cfg.block_k, 32),
            block_dw=64,
            num_warps=4,
        )
    if not aligned:
        # Rows whose strides are no multiple of 16 elements load element by element, one 64-bit address
        # per element: 128-wide tiles then spill. Narrow tiles keep the address tensors in registers.
        cfg = dataclasses.replace(cfg, block_n=min(cfg.block_n, 32), block_k=min(cfg.block_k, 32), block_dw=64)
    return cfg


def fit(block: int, width: int) -> int:
    """``block`` capped at the next power of two >= ``width``, and at least 16 (the smallest ``tl.dot`` side)."""
    return max(16, min(block, 1 << max(width - 1, 0).bit_length()))
