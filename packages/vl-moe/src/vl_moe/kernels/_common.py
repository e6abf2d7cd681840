"""Shared Triton helpers of the MoE kernels (private).

:func:`mma` is ``tl.dot`` with one escape hatch: Triton's CPU interpreter (3.x) multiplies
bfloat16 tiles as their raw 16-bit integer patterns, so under the interpreter the kernels pass
``UPCAST=True`` and both tiles are converted to float32 first. Products of two bfloat16 or
float16 values are exact in float32, so the upcast result equals a tensor-core MMA with float32
accumulation up to the summation order.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["INTERPRET", "mma"]


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):  # type: ignore[no-untyped-def]
    """``acc + a @ b`` with float32 accumulation (``a [M, K]``, ``b [K, N]``, ``acc [M, N]`` float32)."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


INTERPRET: bool = isinstance(mma, InterpretedFunction)
"""Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at first import)."""
