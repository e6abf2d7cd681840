"""The pure-torch routed-experts path: sort by expert, grouped matmuls, hand-written backward.

Computes, for every token ``t`` and each of its ``k`` slots ``j`` routed to expert ``e = ids[t, j]``,

    y_t = sum_j w[t, j] * W_down[e] (silu(x_t W_gate[e]^T) * (x_t W_up[e]^T))

with ``W_gate_up[e] = [W_gate[e]; W_up[e]]`` (gate rows first), the SwiGLU experts of Qwen3-VL-MoE
(arXiv 2511.21631; SwiGLU: Shazeer, arXiv 2002.05202). The routing weight multiplies the ``[S, I]``
activation before the down projection (equal by linearity, and cheaper than scaling ``[S, H]``).

Algorithm (runs on any device and dtype):

1. a stable argsort of the ``S = T k`` expert ids groups the (token, slot) pairs by expert, in a
   deterministic order;
2. two grouped matmuls (``torch._grouped_mm`` where supported, else one ``mm`` per non-empty expert on
   contiguous slices, see :mod:`vl_moe._grouped`);
3. outputs are gathered back to their (token, slot) position, a ``[T, k, H]`` buffer, and summed over
   ``k`` in a fixed order: no atomics, no scatter-add, bit-reproducible.

The backward is written out (:class:`_TorchExperts`), reusing the sort and saving only the gathered
inputs and the gate/up pre-activations; weight gradients are grouped ``a^T b`` products.

Notation: ``T`` tokens, ``H`` hidden, ``I`` expert width, ``E`` experts, ``k`` slots, ``S = T k``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ._grouped import Groups, gmm_nn, gmm_nt, gmm_tn

__all__ = ["torch_moe_experts"]


def _sort_pairs(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Groups]:
    """Stable sort of the flattened ids: ``(perm, inverse, token, groups)``, each index ``[S]``.

    Sorted row ``i`` is pair ``perm[i]`` (token ``token[i]``); pair ``p`` sits at sorted row ``inverse[p]``.
    """
    flat = topk_ids.reshape(-1)
    _, perm = torch.sort(flat, stable=True)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    counts = torch.bincount(flat, minlength=num_experts)
    return perm, inverse, perm // topk_ids.shape[1], Groups(counts)


def _unsort_sum(rows: torch.Tensor, inverse: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """Gather sorted rows ``[S, D]`` back into (token, slot) order ``[T, k, D]`` and sum the k slots."""
    buf = rows.index_select(0, inverse)
    if top_k == 1:
        return buf
    return buf.view(num_tokens, top_k, -1).sum(dim=1)


def _forward(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    use_grouped_mm: bool | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], Groups]:
    """The forward pass: ``(out [T, H], tensors the backward needs, row groups)``."""
    num_tokens, top_k = topk_ids.shape
    inter = w_down.shape[2]
    perm, inverse, token, groups = _sort_pairs(topk_ids, w_gate_up.shape[0])
    xs = x.index_select(0, token)  # [S, H]
    gate_up = gmm_nt(xs, w_gate_up, groups, use_grouped_mm=use_grouped_mm)  # [S, 2I]
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    ws = topk_weights.reshape(-1).index_select(0, perm).to(x.dtype)  # [S]
    scaled = F.silu(gate).mul_(up).mul_(ws[:, None])  # [S, I]
    ys = gmm_nt(scaled, w_down, groups, use_grouped_mm=use_grouped_mm)  # [S, H]
    out = _unsort_sum(ys, inverse, num_tokens, top_k)
    return out, (xs, gate_up, ws, inverse, token), groups


class _TorchExperts(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        w_gate_up: torch.Tensor,
        w_down: torch.Tensor,
        use_grouped_mm: bool | None,
    ) -> torch.Tensor:
        out, saved, groups = _forward(x, topk_weights, topk_ids, w_gate_up, w_down, use_grouped_mm)
        ctx.save_for_backward(*saved, w_gate_up, w_down)
        ctx.groups = groups
        ctx.use_grouped_mm = use_grouped_mm
        ctx.shape = tuple(topk_ids.shape)
        ctx.weights_dtype = topk_weights.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xs, gate_up, ws, inverse, token, w_gate_up, w_down = ctx.saved_tensors
        groups: Groups = ctx.groups
        use = ctx.use_grouped_mm
        num_tokens, top_k = ctx.shape
        need_x, need_w, _, need_gu, need_down, _ = ctx.needs_input_grad
        inter = w_down.shape[2]

        grad_ys = grad_out.contiguous().index_select(0, token)  # [S, H]: every slot of a token sees dy_t
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        silu = F.silu(gate)
        act = silu * up
        grad_scaled = gmm_nn(grad_ys, w_down, groups, use_grouped_mm=use)  # [S, I]

        grad_w_down = None
        if need_down:
            grad_w_down = gmm_tn(grad_ys, act * ws[:, None], groups, use_grouped_mm=use)
        grad_weights = None
        if need_w:
            grad_ws = torch.linalg.vecdot(grad_scaled, act)  # [S]
            grad_weights = grad_ws.index_select(0, inverse).view(num_tokens, top_k).to(ctx.weights_dtype)
        grad_x = grad_w_gate_up = None
        if need_x or need_gu:
            grad_act = grad_scaled.mul_(ws[:, None])
            grad_gate_up = torch.empty_like(gate_up)  # [S, 2I]: d gate, then d up
            torch.mul(grad_act, silu, out=grad_gate_up[:, inter:])
            grad_gate_up[:, :inter] = torch.ops.aten.silu_backward(grad_act.mul_(up), gate)
            if need_gu:
                grad_w_gate_up = gmm_tn(grad_gate_up, xs, groups, use_grouped_mm=use)
            if need_x:
                grad_xs = gmm_nn(grad_gate_up, w_gate_up, groups, use_grouped_mm=use)  # [S, H]
                grad_x = _unsort_sum(grad_xs, inverse, num_tokens, top_k)
        return grad_x, grad_weights, None, grad_w_gate_up, grad_w_down, None


def torch_moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    use_grouped_mm: bool | None = None,
) -> torch.Tensor:
    """SwiGLU routed experts in pure torch, with autograd (no input validation: see :func:`vl_moe.moe_experts`).

    Args:
        x: Tokens ``[T, H]``.
        topk_weights: Routing weights ``[T, k]``; cast to ``x.dtype`` before use.
        topk_ids: Expert ids ``[T, k]`` in ``[0, E)``.
        w_gate_up: ``[E, 2I, H]``, gate rows first.
        w_down: ``[E, H, I]``.
        use_grouped_mm: ``None`` uses ``torch._grouped_mm`` where it supports the operands, ``False``
            always loops over the non-empty experts (the two agree to rounding).

    Returns:
        ``[T, H]`` in ``x.dtype``; gradients flow to ``x``, ``topk_weights``, ``w_gate_up``, ``w_down``.
    """
    x, w_down = x.contiguous(), w_down.contiguous()
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, topk_weights, w_gate_up, w_down))):
        # Inference: skip the autograd.Function machinery and the saved tensors (~15% at decode sizes).
        return _forward(x, topk_weights, topk_ids, w_gate_up, w_down, use_grouped_mm)[0]
    return _TorchExperts.apply(x, topk_weights, topk_ids, w_gate_up, w_down, use_grouped_mm)
