"""Top-k softmax routing of a sparse MoE layer (Qwen3-VL-MoE / Qwen3 style).

Implements the router of the Qwen3-VL technical report (arXiv 2511.21631) as released in Qwen3-MoE:
``logits = x W_g^T`` (no bias), a softmax over all experts in float32, the top-k experts per token,
and (by default) the k weights renormalised to sum to 1, which equals a softmax over the k chosen
logits. Switch Transformer (arXiv 2101.03961, section 2.1) is the origin of the scheme.

Tie-breaking is deterministic: among equal probabilities the lower expert id wins, and the k slots
of a token are ordered by decreasing probability (a stable sort, not ``torch.topk``, whose order of
equal values is unspecified).

Notation: ``T`` tokens, ``H`` hidden size, ``E`` experts, ``k`` experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_finite, check_top_k

__all__ = ["TopKRouter", "route", "router_probs"]


def router_probs(router_logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the experts in float32: ``[..., E] -> [..., E]`` (float32)."""
    return torch.softmax(router_logits.float(), dim=-1)


def route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool = True,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the top-k experts of every token and their weights.

    Args:
        router_logits: Router logits ``[T, E]`` (any leading dims ``[..., E]`` work).
        top_k: Experts per token, ``1 <= top_k <= E``.
        renormalize: Divide the k chosen probabilities by their sum (Qwen3-VL-MoE:
            ``norm_topk_prob=True``); ``False`` keeps the raw softmax probabilities.
        check: Raise on NaN/inf logits (costs a device sync on GPU; skipped under ``torch.compile``).

    Returns:
        ``(topk_weights, topk_ids)``: weights ``[..., k]`` computed in float32 and returned in
        ``router_logits.dtype`` (as transformers does), and expert ids ``[..., k]`` (int64), slots
        in decreasing order of probability, ties broken towards the lower expert id.

    Raises:
        ValueError: ``top_k`` outside ``[1, E]`` or non-finite logits.

    Example:
        >>> logits = torch.tensor([[0.0, 2.0, 2.0, 1.0]])
        >>> weights, ids = route(logits, 2)
        >>> ids.tolist(), weights.tolist()
        ([[1, 2]], [[0.5, 0.5]])
    """
    if router_logits.dim() < 1:
        raise ValueError(f"router_logits must be [..., E], got shape {tuple(router_logits.shape)}")
    check_top_k(top_k, router_logits.shape[-1])
    if check:
        check_finite(router_logits)
    probs = router_probs(router_logits)
    # A stable descending sort keeps equal probabilities in increasing expert-id order, so the lower id
    # wins a tie both inside the top k and at its boundary.
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    topk_weights, topk_ids = sorted_probs[..., :top_k], sorted_ids[..., :top_k]
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights.to(router_logits.dtype), topk_ids


class TopKRouter(nn.Module):
    """The router as a module: a bias-free linear map to ``E`` logits, then :func:`route`.

    Its only parameter is ``weight [E, H]`` (state-dict key ``gate.weight`` inside
    :class:`vl_moe.SparseMoeBlock`, as in transformers' Qwen3-VL-MoE).

    Args:
        hidden_size: ``H``.
        num_experts: ``E``.
        top_k: ``k``.
        renormalize: See :func:`route`.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, renormalize: bool = True) -> None:
        super().__init__()
        check_top_k(top_k, num_experts)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens ``[..., H]``.

        Returns:
            ``(router_logits [T, E], topk_weights [T, k], topk_ids [T, k])`` with ``T`` the number of
            tokens (leading dims flattened), in the order of transformers' router outputs.
        """
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states has hidden size {hidden_states.shape[-1]} but the router expects {self.hidden_size}"
            )
        logits = F.linear(hidden_states.reshape(-1, self.hidden_size), self.weight)
        weights, ids = route(logits, self.top_k, renormalize=self.renormalize)
        return logits, weights, ids

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}"
