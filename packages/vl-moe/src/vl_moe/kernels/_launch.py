"""Launch sequences of the Triton MoE forward, decode forward and backward (private; inputs validated).

Every sequence first passes the device guard (:func:`~vl_moe.kernels._common.check_device`: one
device; CPU only under Triton's interpreter) and launches with the tensors' CUDA device current.
The row-block kernels run on a 1-D grid in grouped order (``cfg.group_m``), the weight-gradient
kernels on an expert-major 1-D grid.

Memory choice: for training the forward keeps, besides ``h [R, I]``, the gate/up
pre-activations ``gu [R, 2I]`` (``R`` padded sorted rows, in the input dtype), so the backward
never recomputes the first grouped GEMM; that is ``3 * I`` values per routed pair (about
4.7 KiB per pair in bf16 at the 30B-A3B width ``I = 768``). Inference (no grad needed) stores
``h`` only. The per-pair buffers ``ys``/``dxs [P, H]`` are summed over slots by the
deterministic combine kernel.

Notation: ``T`` tokens, ``k`` slots, ``P = T * k`` pairs, ``R`` padded sorted rows, ``H`` hidden,
``I`` expert width, ``E`` experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from vl_moe.kernels import _backward_kernels as bwd
from vl_moe.kernels import _common
from vl_moe.kernels import _decode_kernels as dec
from vl_moe.kernels import _forward_kernels as fwd
from vl_moe.kernels.align import Alignment
from vl_moe.kernels.config import KernelConfig, fit

__all__ = ["Saved", "backward", "combine", "decode_forward", "forward"]

INTERPRET: bool = _common.INTERPRET


@dataclass
class Saved:
    """What the forward keeps for the backward: the alignment, ``h [R, I]`` and ``gu [R, 2I]``."""

    align: Alignment
    h: torch.Tensor
    gu: torch.Tensor | None


def _precision(dtype: torch.dtype) -> str | None:
    """``tl.dot`` precision: exact float32 products for float32 inputs (no TF32), the default otherwise."""
    return "ieee" if dtype == torch.float32 else None


def _opts(cfg: KernelConfig) -> dict[str, int]:
    return {} if INTERPRET else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def combine(ys: torch.Tensor, num_tokens: int, top_k: int, out_dtype: torch.dtype, cfg: KernelConfig) -> torch.Tensor:
    """``out[t] = sum_j ys[t*k + j]`` (``ys [P, H]`` contiguous) in slot order, float32 accumulation."""
    hidden = ys.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=out_dtype, device=ys.device)
    if num_tokens == 0:
        return out
    block_n = fit(4 * cfg.block_n, hidden)
    grid = (num_tokens, triton.cdiv(hidden, block_n))
    fwd.combine_kernel[grid](ys, out, top_k, hidden, BLOCK_N=block_n, **({} if INTERPRET else {"num_warps": 4}))
    return out


def forward(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    align: Alignment,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    cfg: KernelConfig,
    *,
    save_gu: bool,
) -> tuple[torch.Tensor, Saved]:
    """``y [T, H]`` and the tensors the backward needs.

    Args:
        x: ``[T, H]`` tokens (any strides).
        topk_weights: ``[P]`` contiguous routing weights in pair order.
        align: The expert-sorted layout (``align.block_m == cfg.block_m``).
        w_gate_up: ``[E, 2I, H]`` (any strides).
        w_down: ``[E, H, I]`` (any strides).
        cfg: Tile sizes.
        save_gu: Also write the gate/up pre-activations (needed by the backward).

    Returns:
        ``(y, saved)``.
    """
    device = _common.check_device("triton_moe_experts", x, topk_weights, w_gate_up, w_down, align.sorted_ids)
    num_tokens, hidden = x.shape
    inter = w_down.shape[2]
    rows = align.sorted_ids.numel()
    prec = _precision(x.dtype)
    h = torch.empty(rows, inter, dtype=x.dtype, device=device)
    gu = torch.empty(rows, 2 * inter, dtype=x.dtype, device=device) if save_gu else None
    ys = torch.empty(align.num_pairs, hidden, dtype=x.dtype, device=device)
    with _common.on_device(device):
        if align.num_pairs:
            nb = align.num_blocks
            bn, bk = fit(cfg.block_n, inter), fit(cfg.block_k, hidden)
            fwd.gemm1_swiglu_kernel[(nb * triton.cdiv(inter, bn),)](
                x, w_gate_up, align.sorted_ids, align.block_expert, h, h if gu is None else gu,
                align.num_pairs, nb, align.top_k, hidden, inter, x.stride(0), x.stride(1), *w_gate_up.stride(),
                STORE_GU=save_gu, PRECISION=prec, UPCAST=INTERPRET, BLOCK_M=cfg.block_m, BLOCK_N=bn, BLOCK_K=bk,
                GROUP_M=cfg.group_m, **_opts(cfg),
            )  # fmt: skip
            bn, bk = fit(cfg.block_n, hidden), fit(cfg.block_k, inter)
            fwd.gemm2_scatter_kernel[(nb * triton.cdiv(hidden, bn),)](
                h, w_down, topk_weights, align.sorted_ids, align.block_expert, ys,
                align.num_pairs, nb, hidden, inter, *w_down.stride(),
                PRECISION=prec, UPCAST=INTERPRET, BLOCK_M=cfg.block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.group_m,
                **_opts(cfg),
            )  # fmt: skip
        y = combine(ys, num_tokens, align.top_k, x.dtype, cfg)
    return y, Saved(align, h, gu)


def decode_forward(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    cfg: KernelConfig,
) -> torch.Tensor:
    """``y [T, H]`` in two launches (no alignment, no combine): the inference path for a few pairs.

    Args:
        x: ``[T, H]`` tokens (any strides).
        topk_weights: ``[P]`` contiguous routing weights in pair order.
        topk_ids: ``[P]`` contiguous expert ids in pair order (already validated or trusted).
        w_gate_up: ``[E, 2I, H]`` (any strides).
        w_down: ``[E, H, I]`` (any strides).
        cfg: Tile sizes (``block_n``/``block_k`` of both GEMVs).
    """
    device = _common.check_device("triton_moe_experts", x, topk_weights, topk_ids, w_gate_up, w_down)
    num_tokens, hidden = x.shape
    inter = w_down.shape[2]
    pairs = topk_ids.numel()
    top_k = pairs // max(num_tokens, 1)
    y = torch.empty(num_tokens, hidden, dtype=x.dtype, device=device)
    if pairs == 0:
        return y
    h = torch.empty(pairs, inter, dtype=x.dtype, device=device)
    opts = {} if INTERPRET else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    with _common.on_device(device):
        bn, bk = fit(cfg.block_n, inter), fit(cfg.block_k, hidden)
        dec.decode_gate_up_kernel[(pairs, triton.cdiv(inter, bn))](
            x, w_gate_up, topk_ids, h, top_k, hidden, inter, x.stride(0), x.stride(1), *w_gate_up.stride(),
            BLOCK_N=bn, BLOCK_K=bk, **opts,
        )  # fmt: skip
        bn, bk = fit(cfg.block_n, hidden), fit(cfg.block_k, inter)
        dec.decode_down_combine_kernel[(num_tokens, triton.cdiv(hidden, bn))](
            h, w_down, topk_ids, topk_weights, y, top_k, hidden, inter, *w_down.stride(),
            BLOCK_N=bn, BLOCK_K=bk, **opts,
        )  # fmt: skip
    return y


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    saved: Saved,
    cfg: KernelConfig,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dx, d_topk_weights [P], dW_gate_up, dW_down)``; ``None`` where ``needs`` is False.

    Args:
        dy: ``[T, H]`` contiguous upstream gradient in the input dtype.
        x: ``[T, H]`` forward input.
        topk_weights: ``[P]`` contiguous routing weights.
        w_gate_up: ``[E, 2I, H]``.
        w_down: ``[E, H, I]``.
        saved: The forward's :class:`Saved` (with ``gu``).
        cfg: The forward's tile sizes.
        needs: Whether each of ``dx, d_topk_weights, dW_gate_up, dW_down`` is wanted.
    """
    align, h, gu = saved.align, saved.h, saved.gu
    assert gu is not None, "the forward ran without save_gu"
    device = _common.check_device("triton_moe_experts backward", dy, x, topk_weights, w_gate_up, w_down, h)
    with _common.on_device(device):
        return _backward(dy, x, topk_weights, w_gate_up, w_down, align, h, gu, cfg, needs)


def _backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    align: Alignment,
    h: torch.Tensor,
    gu: torch.Tensor,
    cfg: KernelConfig,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    num_tokens, hidden = x.shape
    num_experts, inter = w_down.shape[0], w_down.shape[2]
    rows, pairs = h.shape[0], align.num_pairs
    prec = _precision(x.dtype)
    dev = x.device
    need_dx, need_dw, need_dwgu, need_dwd = needs

    dgu = torch.empty(rows, 2 * inter, dtype=x.dtype, device=dev)
    bn_i = fit(cfg.block_n, inter)
    n_tiles = triton.cdiv(inter, bn_i)
    dwp = torch.empty(pairs, n_tiles, dtype=torch.float32, device=dev)
    if pairs:
        bwd.dh_swiglu_kernel[(align.num_blocks * n_tiles,)](
            dy, w_down, topk_weights, h, gu, align.sorted_ids, align.block_expert, dgu, dwp,
            pairs, align.num_blocks, align.top_k, hidden, inter, n_tiles, *w_down.stride(),
            PRECISION=prec, UPCAST=INTERPRET, BLOCK_M=cfg.block_m, BLOCK_N=bn_i, BLOCK_K=fit(cfg.block_k, hidden),
            GROUP_M=cfg.group_m, **_opts(cfg),
        )  # fmt: skip

    # Fixed-order reduction of the per-``I``-tile partials (already in pair order): no atomics, no host sync.
    d_weights = dwp.sum(dim=1).to(topk_weights.dtype) if need_dw else None

    dw_down = None
    if need_dwd:
        dw_down = torch.empty(num_experts, hidden, inter, dtype=w_down.dtype, device=dev)
        bh, bi = fit(cfg.dw_tile, hidden), fit(cfg.dw_tile, inter)
        bwd.dw_down_kernel[(num_experts * triton.cdiv(hidden, bh) * triton.cdiv(inter, bi),)](
            dy, topk_weights, h, align.sorted_ids, align.expert_offsets, dw_down, pairs, align.top_k, hidden, inter,
            PRECISION=prec, UPCAST=INTERPRET, BLOCK_M=cfg.block_m, BLOCK_H=bh, BLOCK_I=bi, **_opts(cfg),
        )  # fmt: skip

    dw_gate_up = None
    if need_dwgu:
        dw_gate_up = torch.empty(num_experts, 2 * inter, hidden, dtype=w_gate_up.dtype, device=dev)
        bn, bh = fit(cfg.dw_tile, 2 * inter), fit(cfg.dw_tile, hidden)
        bwd.dw_gate_up_kernel[(num_experts * triton.cdiv(2 * inter, bn) * triton.cdiv(hidden, bh),)](
            x, dgu, align.sorted_ids, align.expert_offsets, dw_gate_up, pairs, align.top_k, hidden, inter,
            x.stride(0), x.stride(1),
            PRECISION=prec, UPCAST=INTERPRET, BLOCK_M=cfg.block_m, BLOCK_N=bn, BLOCK_H=bh, **_opts(cfg),
        )  # fmt: skip

    dx = None
    if need_dx:
        dxs = torch.empty(pairs, hidden, dtype=x.dtype, device=dev)
        if pairs:
            bn, bk = fit(cfg.block_n, hidden), fit(cfg.block_k, 2 * inter)
            bwd.dx_scatter_kernel[(align.num_blocks * triton.cdiv(hidden, bn),)](
                dgu, w_gate_up, align.sorted_ids, align.block_expert, dxs, pairs, align.num_blocks, hidden, inter,
                *w_gate_up.stride(),
                PRECISION=prec, UPCAST=INTERPRET, BLOCK_M=cfg.block_m, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.group_m,
                **_opts(cfg),
            )  # fmt: skip
        dx = combine(dxs, num_tokens, align.top_k, x.dtype, cfg)
    return dx, d_weights, dw_gate_up, dw_down
