"""A deliberately naive routed-experts reference, for tests (ours and other projects') only.

It computes the SwiGLU experts of Qwen3-VL-MoE (arXiv 2511.21631) one slot at a time by gathering
each token's expert weights (``[T, 2I, H]`` per slot): no sorting, no grouping, no custom backward.
Memory grows as ``T * I * H`` per slot, so keep shapes tiny. Run it in float64 to
get a ground truth for float32 / bfloat16 comparisons; autograd provides its gradients.

Notation: ``T`` tokens, ``H`` hidden, ``I`` expert width, ``E`` experts, ``k`` slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["moe_experts_reference"]


def moe_experts_reference(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """``y_t = sum_j w[t, j] * W_down[e] (silu(W_gate[e] x_t) * W_up[e] x_t)``, ``e = ids[t, j]``.

    Args:
        x: ``[T, H]``.
        topk_weights: ``[T, k]``.
        topk_ids: ``[T, k]``.
        w_gate_up: ``[E, 2I, H]`` (gate rows first).
        w_down: ``[E, H, I]``.

    Returns:
        ``[T, H]`` in the promoted dtype of the inputs.
    """
    inter = w_down.shape[2]
    out = torch.zeros_like(x)
    for slot in range(topk_ids.shape[1]):
        ids = topk_ids[:, slot]
        gate_up = torch.einsum("th,tnh->tn", x, w_gate_up[ids])
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        out = out + topk_weights[:, slot, None] * torch.einsum("ti,thi->th", act, w_down[ids])
    return out
