"""Triton kernels behind :func:`vl_rope.triton_rotary.apply_rotary_fused` (private).

This module imports ``triton`` at the top and is itself imported lazily, on the
first fused call, by :mod:`vl_rope.triton_rotary`. Triton picks between its
compiler and its CPU interpreter when a kernel is decorated, so the
``TRITON_INTERPRET`` environment variable is read once, when this module is
first imported; :data:`INTERPRET` records the mode that was actually chosen.

One program handles one token (one ``(t0, t1)`` index of the canonical
``[T0, T1, H, D]`` view): it loads the token's ``R/2`` angles once, then rotates
every head of ``q`` and of ``k`` in tiles of ``BLOCK_H`` heads, and copies the
``D - R`` pass-through dims. Arithmetic is float32; each output is rounded
once (round to nearest even) to its tensor's dtype.

Notation: ``T0, T1`` token dims, ``H`` heads, ``D`` head dim, ``R`` rotary dims, ``R2 = R / 2`` pairs.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["INTERPRET", "rotary_kernel"]


@triton.jit
def _rotate_heads(  # type: ignore[no-untyped-def]
    x_ptr,
    o_ptr,
    t0,
    t1,
    n_heads,
    sx_t0,
    sx_t1,
    sx_h,
    sx_d,
    so_t0,
    so_t1,
    so_h,
    so_d,
    c,
    s,
    R2,
    D_PASS,
    GPTJ: tl.constexpr,
    ROUND: tl.constexpr,
    HAS_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R2: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Rotate all ``n_heads`` heads of one token of ``x`` into ``o`` (``c``/``s`` are ``[BLOCK_R2]`` fp32)."""
    x_base = x_ptr + t0 * sx_t0 + t1 * sx_t1
    o_base = o_ptr + t0 * so_t0 + t1 * so_t1
    offs_r = tl.arange(0, BLOCK_R2)
    mask_r = offs_r < R2
    if GPTJ:
        d1 = 2 * offs_r
        d2 = d1 + 1
    else:
        d1 = offs_r
        d2 = offs_r + R2
    offs_p = 2 * R2 + tl.arange(0, BLOCK_P)
    mask_p = tl.arange(0, BLOCK_P) < D_PASS
    for h0 in range(0, n_heads, BLOCK_H):
        offs_h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        mask_h = offs_h < n_heads
        m = mask_h[:, None] & mask_r[None, :]
        xh = x_base + offs_h[:, None] * sx_h
        oh = o_base + offs_h[:, None] * so_h
        x1 = tl.load(xh + d1[None, :] * sx_d, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xh + d2[None, :] * sx_d, mask=m, other=0.0).to(tl.float32)
        y1 = x1 * c[None, :] - x2 * s[None, :]
        y2 = x2 * c[None, :] + x1 * s[None, :]
        if ROUND:
            y1 = y1.to(o_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            y2 = y2.to(o_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(oh + d1[None, :] * so_d, y1, mask=m)
        tl.store(oh + d2[None, :] * so_d, y2, mask=m)
        if HAS_PASS:
            mp = mask_h[:, None] & mask_p[None, :]
            xp = tl.load(xh + offs_p[None, :] * sx_d, mask=mp, other=0.0)
            tl.store(oh + offs_p[None, :] * so_d, xp, mask=mp)


@triton.jit
def rotary_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    cos_ptr,
    sin_ptr,
    T1,
    HQ,
    HK,
    R2,
    D_PASS,
    sq_t0,
    sq_t1,
    sq_h,
    sq_d,
    sk_t0,
    sk_t1,
    sk_h,
    sk_d,
    sqo_t0,
    sqo_t1,
    sqo_h,
    sqo_d,
    sko_t0,
    sko_t1,
    sko_h,
    sko_d,
    sc_t0,
    sc_t1,
    sc_r,
    ss_t0,
    ss_t1,
    ss_r,
    GPTJ: tl.constexpr,
    CONJ: tl.constexpr,
    ROUND_Q: tl.constexpr,
    ROUND_K: tl.constexpr,
    HAS_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R2: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Rotate ``q`` and ``k`` of one token by ``theta`` (``CONJ=False``) or ``-theta`` (``CONJ=True``, backward)."""
    pid = tl.program_id(0).to(tl.int64)
    t0 = pid // T1
    t1 = pid % T1
    offs_r = tl.arange(0, BLOCK_R2)
    mask_r = offs_r < R2
    if GPTJ:
        rc = 2 * offs_r
    else:
        rc = offs_r
    c = tl.load(cos_ptr + t0 * sc_t0 + t1 * sc_t1 + rc * sc_r, mask=mask_r, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t0 * ss_t0 + t1 * ss_t1 + rc * ss_r, mask=mask_r, other=0.0).to(tl.float32)
    if CONJ:
        s = -s
    _rotate_heads(
        q_ptr, qo_ptr, t0, t1, HQ, sq_t0, sq_t1, sq_h, sq_d, sqo_t0, sqo_t1, sqo_h, sqo_d, c, s, R2, D_PASS,
        GPTJ, ROUND_Q, HAS_PASS, BLOCK_H, BLOCK_R2, BLOCK_P,
    )  # fmt: skip
    _rotate_heads(
        k_ptr, ko_ptr, t0, t1, HK, sk_t0, sk_t1, sk_h, sk_d, sko_t0, sko_t1, sko_h, sko_d, c, s, R2, D_PASS,
        GPTJ, ROUND_K, HAS_PASS, BLOCK_H, BLOCK_R2, BLOCK_P,
    )  # fmt: skip


INTERPRET: bool = isinstance(rotary_kernel, InterpretedFunction)
"""Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at first import)."""
