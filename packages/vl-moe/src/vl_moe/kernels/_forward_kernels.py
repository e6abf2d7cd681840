"""Triton kernels of the MoE forward: grouped SwiGLU GEMM, grouped down GEMM, deterministic combine (private).

The experts are SwiGLU MLPs (Shazeer, "GLU Variants Improve Transformer", arXiv 2002.05202,
section 2) in the transformers 5.x layout: ``W_gu [E, 2I, H]`` (gate rows first, then up rows)
and ``W_d [E, H, I]``. Per routed pair ``p = (t, j)`` of expert ``e``:
``h_p = silu(x_t W_g[e]^T) * (x_t W_u[e]^T)`` and ``y_t = sum_j w_{t,j} h_p W_d[e]^T``.

- :func:`gemm1_swiglu_kernel`: one program per (row block, ``I`` tile), in grouped order
  (:func:`~vl_moe.kernels._common.grouped_tile`: ``GROUP_M`` row blocks sweep all ``I`` tiles
  together, so their gathered ``x`` rows are read from memory once, not once per tile). The block's ``x`` rows
  are gathered through the sorted pair index (``token = pair // k``; no permuted copy of ``x``
  is ever made); the gate and up tiles are accumulated together from one load of each ``x``
  tile, and ``h = silu(g) * u`` is written in sorted order (optionally ``g``/``u`` too, for
  the backward).
- :func:`gemm2_scatter_kernel`: one program per (row block, ``H`` tile), grouped likewise: ``h W_d^T``, times the
  routing weight in the epilogue, written to the pair's original row of ``ys [P, H]``.
- :func:`combine_kernel`: ``y_t = sum_j ys[t*k + j]`` in slot order with float32 accumulation
  (no atomics: the same bits for the same inputs).

Pointer offsets are int64 (rows are int64 pair/row indices), so buffers above ``2**31``
elements are addressed correctly. Accumulation is float32; each stored tensor is rounded once.

Notation: ``T`` tokens, ``k`` slots, ``P = T * k`` pairs, ``H`` hidden, ``I`` expert width,
``E`` experts, ``BM/BN/BK`` tile sizes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vl_moe.kernels._common import grouped_tile, mma

__all__ = ["combine_kernel", "gemm1_swiglu_kernel", "gemm2_scatter_kernel"]


@triton.jit
def gemm1_swiglu_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    w_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    h_ptr,
    gu_ptr,
    num_pairs,
    num_blocks,
    top_k,
    H,
    I,
    sx_t,
    sx_h,
    sw_e,
    sw_n,
    sw_h,
    STORE_GU: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``h [R, I]`` (and ``gu [R, 2I]`` if ``STORE_GU``) for one (row block, ``I`` tile); ``R`` sorted rows."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_blocks, tl.cdiv(I, BLOCK_N), GROUP_M)
    pid_m = pid_m.to(tl.int64)
    pid_n = pid_n.to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + rows)
    valid = pairs < num_pairs
    tokens = pairs // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    x_rows = x_ptr + tokens[:, None] * sx_t
    w_gate = w_ptr + expert * sw_e + offs_n[None, :] * sw_n
    w_up = w_gate + I * sw_n
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        a = tl.load(x_rows + offs_k[None, :] * sx_h, mask=valid[:, None] & mask_k[None, :], other=0.0)
        wmask = mask_k[:, None] & mask_n[None, :]
        wg = tl.load(w_gate + offs_k[:, None] * sw_h, mask=wmask, other=0.0)
        wu = tl.load(w_up + offs_k[:, None] * sw_h, mask=wmask, other=0.0)
        acc_g = mma(a, wg, acc_g, PRECISION, UPCAST)
        acc_u = mma(a, wu, acc_u, PRECISION, UPCAST)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    out = rows[:, None] * I + offs_n[None, :]
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=mask_n[None, :])
    if STORE_GU:
        gu = gu_ptr + rows[:, None] * (2 * I) + offs_n[None, :]
        tl.store(gu, acc_g.to(gu_ptr.dtype.element_ty), mask=mask_n[None, :])
        tl.store(gu + I, acc_u.to(gu_ptr.dtype.element_ty), mask=mask_n[None, :])


@triton.jit
def gemm2_scatter_kernel(  # type: ignore[no-untyped-def]
    h_ptr,
    w_ptr,
    topk_w_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    ys_ptr,
    num_pairs,
    num_blocks,
    H,
    I,
    sw_e,
    sw_h,
    sw_i,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``ys[pair] = w_pair * h_row W_d[e]^T`` for one (row block, ``H`` tile); ``ys`` is ``[P, H]``."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_blocks, tl.cdiv(H, BLOCK_N), GROUP_M)
    pid_m = pid_m.to(tl.int64)
    pid_n = pid_n.to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + rows)
    valid = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    h_rows = h_ptr + rows[:, None] * I
    w_cols = w_ptr + expert * sw_e + offs_n[None, :] * sw_h
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < I
        a = tl.load(h_rows + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_cols + offs_k[:, None] * sw_i, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION, UPCAST)
    weight = tl.load(topk_w_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    out = ys_ptr + pairs[:, None] * H + offs_n[None, :]
    tl.store(out, acc.to(ys_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


@triton.jit
def combine_kernel(  # type: ignore[no-untyped-def]
    ys_ptr,
    out_ptr,
    top_k,
    H,
    BLOCK_N: tl.constexpr,
):
    """``out[t] = sum_j ys[t*k + j]`` for one (token, ``H`` tile), slots summed in order in float32."""
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < H
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(top_k):
        acc += tl.load(ys_ptr + (token * top_k + j) * H + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * H + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
