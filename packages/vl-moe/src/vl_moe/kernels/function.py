"""``triton_moe_experts``: the routed SwiGLU experts of a sparse MoE layer as Triton kernels, with autograd.

Computes, for tokens ``x [T, H]`` routed to ``k`` experts each (Qwen3-VL-MoE experts; Shazeer,
arXiv 2002.05202, section 2, SwiGLU; Fedus et al., arXiv 2101.03961, top-k routing):

``y_t = sum_j w_{t,j} * (silu(x_t W_g[e]^T) * (x_t W_u[e]^T)) W_d[e]^T`` with ``e = topk_ids[t, j]``,

``W_g``/``W_u`` the first/second ``I`` rows of ``w_gate_up [E, 2I, H]`` and ``W_d = w_down [E, H, I]``.
Pipeline: :func:`~vl_moe.kernels.align.align_tokens` (Triton counting sort by expert), grouped
GEMM 1 with SwiGLU fused (rows gathered through the sorted index), grouped GEMM 2 with the
routing weight in the epilogue, deterministic combine; the backward gives ``dx``,
``d topk_weights``, ``dW_gate_up`` and ``dW_down`` without atomics (bitwise reproducible).
Supports float32, float16 and bfloat16 (all of ``x``, ``w_gate_up``, ``w_down`` in one dtype;
``topk_weights`` any float dtype, used in float32). On CPU tensors it runs in Triton's
interpreter, which needs ``TRITON_INTERPRET=1`` before the kernels are first imported.

Notation: ``T`` tokens, ``k`` slots per token, ``H`` hidden, ``I`` expert width, ``E`` experts.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from vl_moe.kernels.align import Alignment, align_tokens, check_topk_ids
from vl_moe.kernels.config import KernelConfig
from vl_moe.kernels.table import pick_config

__all__ = ["triton_moe_experts"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> None:
    """Raise :class:`ValueError` naming the mismatch (with both numbers) on any inconsistent input."""
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D [T, H], got {x.ndim}-D with shape {tuple(x.shape)}")
    if w_gate_up.ndim != 3 or w_down.ndim != 3:
        raise ValueError(
            f"w_gate_up [E, 2I, H] and w_down [E, H, I] must be 3-D, got shapes {tuple(w_gate_up.shape)} "
            f"and {tuple(w_down.shape)}"
        )
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise ValueError(
            f"x, w_gate_up and w_down must share one dtype, got {x.dtype}, {w_gate_up.dtype} and {w_down.dtype}"
        )
    if not topk_weights.dtype.is_floating_point:
        raise ValueError(f"topk_weights must be a floating tensor, got dtype {topk_weights.dtype}")
    num_tokens, hidden = x.shape
    num_experts, two_inter, h_gu = w_gate_up.shape
    e_d, h_d, inter = w_down.shape
    if h_gu != hidden:
        raise ValueError(f"w_gate_up hidden dim (last) is {h_gu} but x has hidden size {hidden}")
    if h_d != hidden:
        raise ValueError(f"w_down hidden dim (dim 1) is {h_d} but x has hidden size {hidden}")
    if e_d != num_experts:
        raise ValueError(f"w_gate_up has {num_experts} experts but w_down has {e_d}")
    if two_inter != 2 * inter:
        raise ValueError(f"w_gate_up dim 1 must be 2 * I = {2 * inter} (I from w_down), got {two_inter}")
    if topk_weights.shape != topk_ids.shape or topk_ids.ndim != 2:
        raise ValueError(
            f"topk_weights and topk_ids must both be [T, k], got {tuple(topk_weights.shape)} and {tuple(topk_ids.shape)}"
        )
    if topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} tokens but x has {num_tokens}")
    if topk_ids.shape[1] < 1:
        raise ValueError(f"top_k must be >= 1, got {topk_ids.shape[1]}")
    check_topk_ids(topk_ids[:0], num_experts)  # dtype / rank only; the range check (a sync) comes after the guard


class _TritonMoEExperts(torch.autograd.Function):
    """Autograd wrapper: forward and backward launch sequences of :mod:`vl_moe.kernels._launch`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
        config: KernelConfig,
        train: bool,
    ) -> torch.Tensor:
        from vl_moe.kernels import _launch

        num_experts = w_gate_up.shape[0]
        weights = topk_weights.reshape(-1).contiguous()
        align = align_tokens(topk_ids, num_experts, config.block_m, validate=False)
        y, saved = _launch.forward(x, weights, align, w_gate_up, w_down, config, save_gu=train)
        if train:
            assert saved.gu is not None
            ctx.save_for_backward(
                x, weights, w_gate_up, w_down, saved.h, saved.gu,
                align.sorted_ids, align.block_expert, align.expert_offsets,
            )  # fmt: skip
            ctx.meta = (align.num_pairs, align.top_k, align.block_m, config, topk_weights.shape)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        from vl_moe.kernels import _launch

        x, weights, w_gate_up, w_down, h, gu, sorted_ids, block_expert, expert_offsets = ctx.saved_tensors
        num_pairs, top_k, block_m, config, weights_shape = ctx.meta
        align = Alignment(sorted_ids, block_expert, expert_offsets, num_pairs, top_k, block_m)
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        dy = grad_y.to(x.dtype).contiguous()
        dx, d_weights, dw_gate_up, dw_down = _launch.backward(
            dy, x, weights, w_gate_up, w_down, _launch.Saved(align, h, gu), config, needs
        )
        d_topk = None if d_weights is None else d_weights.reshape(weights_shape)
        return dx, d_topk, None, dw_gate_up, dw_down, None, None


def triton_moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    config: KernelConfig | None = None,
    validate_ids: bool = True,
) -> torch.Tensor:
    """Routed SwiGLU experts, ``y [T, H]``, as Triton kernels; differentiable in all float inputs.

    Args:
        x: ``[T, H]`` tokens (float32, float16 or bfloat16).
        topk_weights: ``[T, k]`` routing weight of each chosen expert (any float dtype).
        topk_ids: ``[T, k]`` integer expert ids in ``[0, E)``.
        w_gate_up: ``[E, 2I, H]`` gate rows (first ``I``) then up rows, in ``x.dtype``.
        w_down: ``[E, H, I]`` down projection, in ``x.dtype``.
        config: Tile sizes; default :func:`~vl_moe.kernels.table.pick_config`: the tuned table for this
            GPU and shape if one exists, else a rule from the routing size. Inference with few routed
            pairs (``config.decode``) runs the two-launch decode path.
        validate_ids: Check every id is in ``[0, E)`` (one host synchronisation; turn off only for
            trusted router output, e.g. in CUDA-graph-captured decode).

    Returns:
        ``y [T, H]`` in ``x.dtype``; gradients flow to ``x``, ``topk_weights``, ``w_gate_up`` and ``w_down``.

    Raises:
        ValueError: On inconsistent shapes, dtypes or devices, an expert id outside ``[0, E)``, or CPU
            tensors without Triton's interpreter.
        ImportError: When Triton is not installed.
    """
    from vl_moe.kernels import HAS_TRITON

    if not HAS_TRITON:
        raise ImportError("triton_moe_experts needs Triton: `pip install vl-moe[triton]` (or use the torch backend)")
    _check(x, topk_weights, topk_ids, w_gate_up, w_down)
    from vl_moe.kernels import _common, _launch

    # The device guard before the id range check (which reads the ids on their device).
    _common.check_device("triton_moe_experts", x, topk_weights, topk_ids, w_gate_up, w_down)
    if validate_ids:
        check_topk_ids(topk_ids, w_gate_up.shape[0])
    # Under no_grad `ctx.needs_input_grad` still reflects requires_grad, so decide here whether to keep g/u.
    train = torch.is_grad_enabled() and any(t.requires_grad for t in (x, topk_weights, w_gate_up, w_down))
    if config is None:
        config = pick_config(
            topk_ids.numel(), w_gate_up.shape[0], interpret=_launch.INTERPRET, train=train, hidden=x.shape[1],
            inter=w_down.shape[2], top_k=topk_ids.shape[1], dtype=x.dtype, device_name=_device_name(x.device),
        )  # fmt: skip
    if config.decode and not train:
        weights = topk_weights.reshape(-1).contiguous()
        return _launch.decode_forward(x, weights, topk_ids.reshape(-1).contiguous(), w_gate_up, w_down, config)
    return _TritonMoEExperts.apply(x, topk_weights, topk_ids, w_gate_up, w_down, config, train)


@functools.lru_cache(maxsize=16)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _device_name(device: torch.device) -> str | None:
    """The GPU model (the tuned tables' key), ``None`` off CUDA; cached: a host call, no synchronisation."""
    if device.type != "cuda":
        return None
    return _cuda_name(torch.cuda.current_device() if device.index is None else device.index)
