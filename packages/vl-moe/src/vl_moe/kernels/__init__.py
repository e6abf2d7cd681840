"""Triton kernels for the routed experts of a sparse MoE layer (forward and backward).

Public entry points:

- :func:`triton_moe_experts` ``(x [T, H], topk_weights [T, k], topk_ids [T, k], w_gate_up [E, 2I, H],
  w_down [E, H, I]) -> y [T, H]``: SwiGLU experts with autograd (grads for ``x``, ``topk_weights``,
  ``w_gate_up``, ``w_down``), float32 / float16 / bfloat16, deterministic.
- :func:`align_tokens` ``(topk_ids, num_experts, block_m) -> Alignment``: the Triton counting sort of
  the routed pairs by expert, padded per expert to ``block_m`` rows.
- :class:`KernelConfig`, :func:`pick_config`: tile sizes (a tuned table where one exists, a rule otherwise);
  :data:`DECODE_MAX_PAIRS`: inference batches up to this many routed pairs take the two-launch decode path.
- :mod:`vl_moe.kernels.table`: tuned tables, one JSON file per (GPU model, layer shape);
  ``python -m vl_moe.kernels.tune`` sweeps the configs on a GPU and writes one.

Triton is optional for ``vl_moe`` as a whole: this sub-package imports without it and raises
:class:`ImportError` only when a kernel is called. The kernel modules are imported on first use;
Triton chooses between its compiler and its CPU interpreter then, so ``TRITON_INTERPRET=1`` must be
set before the first call to run on CPU tensors. The design is described in
``docs/packages/vl-moe-kernels.md``.
"""

from __future__ import annotations

from vl_moe.kernels.align import Alignment, align_tokens
from vl_moe.kernels.config import DECODE_MAX_PAIRS, KernelConfig
from vl_moe.kernels.function import triton_moe_experts
from vl_moe.kernels.table import pick_config

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False
else:
    HAS_TRITON = True

__all__ = [
    "DECODE_MAX_PAIRS",
    "HAS_TRITON",
    "Alignment",
    "KernelConfig",
    "align_tokens",
    "pick_config",
    "triton_moe_experts",
]
