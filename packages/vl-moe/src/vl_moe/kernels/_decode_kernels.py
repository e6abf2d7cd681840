"""Triton kernels of the small-batch (decode) MoE forward: two launches, no alignment (private).

At decode a batch has a handful of tokens, so the ``P = T * k`` routed pairs mostly go to distinct
experts and the layer is bound by reading those experts' weights once. The sorted, block-padded
path (alignment, grouped GEMMs on 16-row blocks that are mostly padding, combine) then spends most
of its time in launches: seven of them. Here each pair is handled where it lies, and the slot sum
is fused into the second GEMV:

- :func:`decode_gate_up_kernel`: one program per (pair, ``I`` tile):
  ``h_p = silu(x_t W_g[e]^T) * (x_t W_u[e]^T)``, read straight from ``topk_ids`` (``e``) and
  ``x`` (``t = p // k``), written to ``h [P, I]``.
- :func:`decode_down_combine_kernel`: one program per (token, ``H`` tile):
  ``y_t = sum_j w_{t,j} h_{t*k+j} W_d[e_j]^T``, slots in order, float32 accumulation.

Both are GEMVs on the CUDA cores (broadcast multiply and row sums): with one row per pair a
tensor-core tile would be almost all padding, and the weights' bytes, not the arithmetic, set the
time. ``h`` is rounded once to the input dtype, as in the sorted path; the slot sum stays float32.
Inference only: the backward needs the sorted layout, so training always takes the sorted path.

Notation: ``T`` tokens, ``k`` slots, ``P = T * k`` pairs, ``H`` hidden, ``I`` expert width,
``BN``/``BK`` tile sizes.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["decode_down_combine_kernel", "decode_gate_up_kernel"]


@triton.jit
def decode_gate_up_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    w_ptr,
    ids_ptr,
    h_ptr,
    top_k,
    H,
    I,
    sx_t,
    sx_h,
    sw_e,
    sw_n,
    sw_h,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``h[p, n_tile] = silu(x_t W_g[e]^T) * (x_t W_u[e]^T)`` for one (pair, ``I`` tile); ``h`` is ``[P, I]``."""
    pair = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    x_row = x_ptr + (pair // top_k) * sx_t
    w_gate = w_ptr + expert * sw_e + offs_n[:, None] * sw_n
    w_up = w_gate + I * sw_n
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        xv = tl.load(x_row + offs_k * sx_h, mask=mask_k, other=0.0).to(tl.float32)
        wmask = mask_n[:, None] & mask_k[None, :]
        wg = tl.load(w_gate + offs_k[None, :] * sw_h, mask=wmask, other=0.0).to(tl.float32)
        wu = tl.load(w_up + offs_k[None, :] * sw_h, mask=wmask, other=0.0).to(tl.float32)
        acc_g += tl.sum(wg * xv[None, :], axis=1)
        acc_u += tl.sum(wu * xv[None, :], axis=1)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + pair * I + offs_n, h.to(h_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def decode_down_combine_kernel(  # type: ignore[no-untyped-def]
    h_ptr,
    w_ptr,
    ids_ptr,
    topk_w_ptr,
    y_ptr,
    top_k,
    H,
    I,
    sw_e,
    sw_h,
    sw_i,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``y[t, n_tile] = sum_j w_{t,j} h_{t*k+j} W_d[e_j]^T`` for one (token, ``H`` tile); ``y`` is ``[T, H]``."""
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(top_k):
        pair = token * top_k + j
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        weight = tl.load(topk_w_ptr + pair).to(tl.float32)
        w_rows = w_ptr + expert * sw_e + offs_n[:, None] * sw_h
        part = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < I
            hv = tl.load(h_ptr + pair * I + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            wd = tl.load(w_rows + offs_k[None, :] * sw_i, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            part += tl.sum(wd.to(tl.float32) * hv[None, :], axis=1)
        acc += weight * part
    tl.store(y_ptr + token * H + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)
