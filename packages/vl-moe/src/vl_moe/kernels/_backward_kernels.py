"""Triton kernels of the MoE backward: dh with fused SwiGLU backward, grouped dW, gathered dX (private).

Given ``dY [T, H]`` and the forward's saved ``h [R, I]`` and ``gu [R, 2I]`` (sorted rows ``R``),
per pair ``p = (t, j)`` of expert ``e`` with routing weight ``w_p``:

- ``dh_p = w_p dY_t W_d[e]`` and ``dw_p = <h_p W_d[e]^T, dY_t> = <h_p, dY_t W_d[e]>``, then through
  SwiGLU: ``dg = dh * u * s * (1 + g (1 - s))`` with ``s = sigmoid(g)``, ``du = dh * silu(g)``
  (:func:`dh_swiglu_kernel`; ``dw`` is written as one partial sum per ``I`` tile and reduced
  afterwards in a fixed order). This kernel and :func:`dx_scatter_kernel` run their (row block,
  column tile) programs in grouped order, as the forward GEMMs do.
- ``dW_d[e] = sum_p (w_p dY_t)^T h_p`` and ``dW_gu[e] = sum_p dgu_p^T x_t``: one program per
  (expert, output tile) loops over that expert's padded run of rows (:func:`dw_down_kernel`,
  :func:`dw_gate_up_kernel`); no atomics, so each weight gradient has one fixed summation order.
  The grid is expert-major (an expert's tiles are consecutive programs, sharing its rows in L2).
- ``dx_p = dgu_p W_gu[e]`` written to the pair's original row (:func:`dx_scatter_kernel`); the
  slots of a token are then summed in order by the forward's combine kernel.

All pointer offsets are int64; accumulation is float32.

Notation: ``T`` tokens, ``k`` slots, ``P = T * k`` pairs, ``R`` padded sorted rows, ``H`` hidden,
``I`` expert width, ``E`` experts, ``BM/BN/BK`` tile sizes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from vl_moe.kernels._common import grouped_tile, mma

__all__ = ["dh_swiglu_kernel", "dw_down_kernel", "dw_gate_up_kernel", "dx_scatter_kernel"]


@triton.jit
def dh_swiglu_kernel(  # type: ignore[no-untyped-def]
    dy_ptr,
    w_ptr,
    topk_w_ptr,
    h_ptr,
    gu_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    dgu_ptr,
    dwp_ptr,
    num_pairs,
    num_blocks,
    top_k,
    H,
    I,
    num_n_tiles,
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
    """``dgu [R, 2I]`` and the routing-weight partials ``dwp [P, num_n_tiles]`` (pair order) for one (row block, ``I`` tile)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_blocks, num_n_tiles, GROUP_M)
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
    dy_rows = dy_ptr + tokens[:, None] * H
    w_cols = w_ptr + expert * sw_e + offs_n[None, :] * sw_i
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        a = tl.load(dy_rows + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_cols + offs_k[:, None] * sw_h, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION, UPCAST)
    tile = rows[:, None] * I + offs_n[None, :]
    h = tl.load(h_ptr + tile, mask=mask_n[None, :], other=0.0).to(tl.float32)
    tl.store(dwp_ptr + pairs * num_n_tiles + pid_n, tl.sum(h * acc, axis=1), mask=valid)
    weight = tl.load(topk_w_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
    dh = acc * weight[:, None]
    gu = gu_ptr + rows[:, None] * (2 * I) + offs_n[None, :]
    g = tl.load(gu, mask=mask_n[None, :], other=0.0).to(tl.float32)
    u = tl.load(gu + I, mask=mask_n[None, :], other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    du = dh * g * sig
    dgu = dgu_ptr + rows[:, None] * (2 * I) + offs_n[None, :]
    tl.store(dgu, dg.to(dgu_ptr.dtype.element_ty), mask=mask_n[None, :])
    tl.store(dgu + I, du.to(dgu_ptr.dtype.element_ty), mask=mask_n[None, :])


@triton.jit
def dw_down_kernel(  # type: ignore[no-untyped-def]
    dy_ptr,
    topk_w_ptr,
    h_ptr,
    sorted_ids_ptr,
    expert_offsets_ptr,
    dw_ptr,
    num_pairs,
    top_k,
    H,
    I,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    """``dW_d[e, h_tile, i_tile] = sum over e's rows of (w dY_t)^T h`` (``dW_d`` is ``[E, H, I]``, contiguous).

    Expert-major 1-D grid: consecutive programs are the tiles of one expert, so they share that
    expert's rows of ``dY`` and ``h`` through L2.
    """
    pid = tl.program_id(0)
    tiles_i = tl.cdiv(I, BLOCK_I)
    tiles = tl.cdiv(H, BLOCK_H) * tiles_i
    expert = (pid // tiles).to(tl.int64)
    offs_h = ((pid % tiles) // tiles_i).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_i = ((pid % tiles) % tiles_i).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_h = offs_h < H
    mask_i = offs_i < I
    start = tl.load(expert_offsets_ptr + expert)
    end = tl.load(expert_offsets_ptr + expert + 1)
    acc = tl.zeros([BLOCK_H, BLOCK_I], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_ids_ptr + rows)
        valid = pairs < num_pairs
        tokens = pairs // top_k
        weight = tl.load(topk_w_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + tokens[:, None] * H + offs_h[None, :], mask=valid[:, None] & mask_h[None, :], other=0.0)
        dys = (dy.to(tl.float32) * weight[:, None]).to(h_ptr.dtype.element_ty)
        h = tl.load(h_ptr + rows[:, None] * I + offs_i[None, :], mask=valid[:, None] & mask_i[None, :], other=0.0)
        acc = mma(tl.trans(dys), h, acc, PRECISION, UPCAST)
    out = dw_ptr + expert * H * I + offs_h[:, None] * I + offs_i[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_i[None, :])


@triton.jit
def dw_gate_up_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    dgu_ptr,
    sorted_ids_ptr,
    expert_offsets_ptr,
    dw_ptr,
    num_pairs,
    top_k,
    H,
    I,
    sx_t,
    sx_h,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``dW_gu[e, n_tile, h_tile] = sum over e's rows of dgu^T x_t`` (``dW_gu`` is ``[E, 2I, H]``, contiguous).

    Expert-major 1-D grid, like :func:`dw_down_kernel`.
    """
    pid = tl.program_id(0)
    tiles_h = tl.cdiv(H, BLOCK_H)
    tiles = tl.cdiv(2 * I, BLOCK_N) * tiles_h
    expert = (pid // tiles).to(tl.int64)
    offs_n = ((pid % tiles) // tiles_h).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = ((pid % tiles) % tiles_h).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_n = offs_n < 2 * I
    mask_h = offs_h < H
    start = tl.load(expert_offsets_ptr + expert)
    end = tl.load(expert_offsets_ptr + expert + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_ids_ptr + rows)
        valid = pairs < num_pairs
        tokens = pairs // top_k
        dgu = tl.load(
            dgu_ptr + rows[:, None] * (2 * I) + offs_n[None, :], mask=valid[:, None] & mask_n[None, :], other=0.0
        )
        x = tl.load(
            x_ptr + tokens[:, None] * sx_t + offs_h[None, :] * sx_h, mask=valid[:, None] & mask_h[None, :], other=0.0
        )
        acc = mma(tl.trans(dgu), x, acc, PRECISION, UPCAST)
    out = dw_ptr + expert * (2 * I) * H + offs_n[:, None] * H + offs_h[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_h[None, :])


@triton.jit
def dx_scatter_kernel(  # type: ignore[no-untyped-def]
    dgu_ptr,
    w_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    dxs_ptr,
    num_pairs,
    num_blocks,
    H,
    I,
    sw_e,
    sw_n,
    sw_h,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``dxs[pair] = dgu_row W_gu[e]`` for one (row block, ``H`` tile); ``dxs`` is ``[P, H]``."""
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
    dgu_rows = dgu_ptr + rows[:, None] * (2 * I)
    w_cols = w_ptr + expert * sw_e + offs_n[None, :] * sw_h
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, 2 * I, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < 2 * I
        a = tl.load(dgu_rows + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_cols + offs_k[:, None] * sw_n, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION, UPCAST)
    out = dxs_ptr + pairs[:, None] * H + offs_n[None, :]
    tl.store(out, acc.to(dxs_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])
