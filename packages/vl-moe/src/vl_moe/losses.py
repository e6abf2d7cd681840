"""Auxiliary router losses: Switch-style load balancing (padding aware, global-batch capable) and z-loss.

Load balancing (Switch Transformer, arXiv 2101.03961, eqs. 4-6, generalised to top-k as in
Qwen3-VL-MoE): for one layer

    L_aux = E * sum_e f_e * P_e

with ``f_e`` the share of the ``T k`` (token, slot) assignments that went to expert ``e`` per token
(so ``sum_e f_e = k``) and ``P_e`` the mean full-softmax probability of ``e`` (``sum_e P_e = 1``).
Perfect balance (``f_e = k/E``, ``P_e = 1/E``) gives exactly ``k``. Padding tokens (mask 0) count in
neither. ``f`` carries no gradient; the router learns through ``P``.

Global-batch balancing (Qiu et al., arXiv 2501.11873): ``f`` is computed over the whole global batch
(all micro-batches, all data-parallel ranks) instead of the local micro-batch, while ``P`` stays
local. Pass those global counts as ``counts``/``num_tokens`` (see :class:`vl_moe.MoEBalanceTracker`).

Router z-loss (ST-MoE, Zoph et al., arXiv 2202.08906, eq. 5): the mean over tokens of
``logsumexp(logits)^2``, which keeps router logits small.

Differences from transformers' ``load_balancing_loss_func`` (Mixtral / Qwen3-VL-MoE): for a single
layer the two agree (also with an attention mask; theirs takes the softmax in the logits' dtype, ours
in float32). For several layers transformers pools ``f`` and ``P`` over layers before taking one product
(``E sum_e mean_l(f_le) mean_l(P_le)``); ours averages the per-layer losses (``mean_l E sum_e f_le P_le``),
since each layer balances its own experts.

Notation: ``T`` tokens, ``E`` experts, ``k`` experts per token, ``l`` layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import check_finite, check_top_k
from .router import route, router_probs

__all__ = ["expert_counts", "load_balancing_loss", "router_z_loss"]

LogitsArg = torch.Tensor | Sequence[torch.Tensor]


def _flat_mask(attention_mask: torch.Tensor | None, num_tokens: int, device: torch.device) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if attention_mask.numel() != num_tokens:
        raise ValueError(
            f"attention_mask has {attention_mask.numel()} entries (shape {tuple(attention_mask.shape)}) but the router "
            f"logits have {num_tokens} tokens"
        )
    return attention_mask.reshape(-1).to(device=device, dtype=torch.float32)


def _as_layers(router_logits: LogitsArg) -> list[torch.Tensor]:
    layers = [router_logits] if isinstance(router_logits, torch.Tensor) else list(router_logits)
    if not layers:
        raise ValueError("router_logits is an empty sequence; pass at least one layer's logits")
    return [t.reshape(-1, t.shape[-1]) for t in layers]


def expert_counts(
    expert_ids: torch.Tensor, num_experts: int, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignments per expert and the number of (unmasked) tokens, both float32.

    Args:
        expert_ids: ``[T, k]`` (or ``[..., k]``) expert ids in ``[0, E)``.
        num_experts: ``E``.
        attention_mask: ``T`` entries, 1 for real tokens and 0 for padding (any shape, e.g. ``[B, L]``).

    Returns:
        ``(counts [E], num_tokens [])``: ``counts.sum() == k * num_tokens``.
    """
    ids = expert_ids.reshape(-1, expert_ids.shape[-1])
    num_tokens, top_k = ids.shape
    mask = _flat_mask(attention_mask, num_tokens, ids.device)
    ones = torch.ones(ids.numel(), device=ids.device) if mask is None else mask.repeat_interleave(top_k)
    counts = torch.zeros(num_experts, device=ids.device).index_add_(0, ids.reshape(-1), ones)
    total = torch.tensor(float(num_tokens), device=ids.device) if mask is None else mask.sum()
    return counts, total


def _layer_loss(
    logits: torch.Tensor,
    top_k: int,
    ids: torch.Tensor | None,
    mask: torch.Tensor | None,
    counts: torch.Tensor | None,
    num_tokens: torch.Tensor | float | None,
) -> torch.Tensor:
    num_experts = logits.shape[-1]
    probs = router_probs(logits)  # [T, E] float32
    if mask is None:
        prob_mean = probs.mean(dim=0)
    else:
        prob_mean = (probs * mask[:, None]).sum(dim=0) / mask.sum().clamp_min(1.0)
    if counts is None:
        if ids is None:
            ids = route(logits.detach(), top_k, check=False)[1]
        elif ids.reshape(-1, ids.shape[-1]).shape != (logits.shape[0], top_k):
            raise ValueError(
                f"expert_ids must be [T, k] = {(logits.shape[0], top_k)} to match the router logits "
                f"{tuple(logits.shape)}, got {tuple(ids.shape)}"
            )
        counts, num_tokens = expert_counts(ids, num_experts, mask)
    elif counts.shape != (num_experts,):
        raise ValueError(
            f"counts must be [E] = ({num_experts},) for logits {tuple(logits.shape)}, got {tuple(counts.shape)}"
        )
    if num_tokens is None:
        raise ValueError("num_tokens is required with counts (the number of tokens the counts were taken over)")
    total = torch.as_tensor(num_tokens, dtype=torch.float32, device=logits.device).clamp_min(1.0)
    frac = counts.to(device=logits.device, dtype=torch.float32).detach() / total  # sums to k
    return num_experts * (frac * prob_mean).sum()


def load_balancing_loss(
    router_logits: LogitsArg,
    top_k: int,
    *,
    expert_ids: torch.Tensor | Sequence[torch.Tensor] | None = None,
    attention_mask: torch.Tensor | None = None,
    counts: torch.Tensor | Sequence[torch.Tensor] | None = None,
    num_tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Switch-style auxiliary loss ``E * sum_e f_e P_e`` (``= k`` at perfect balance).

    Args:
        router_logits: ``[T, E]`` (or ``[B, L, E]``), or a sequence of them, one per MoE layer (the
            result is the mean of the per-layer losses).
        top_k: ``k``, the experts per token the model routes to.
        expert_ids: The ``[T, k]`` ids the model actually used (one per layer for a sequence); by
            default recomputed from the logits with :func:`vl_moe.route`'s tie-breaking.
        attention_mask: ``T`` entries (e.g. ``[B, L]``), 0 for padding; padding counts in neither f nor P.
        counts: Global-batch balancing: assignment counts ``[E]`` per layer taken over the global batch
            (all micro-batches and ranks), e.g. from :class:`vl_moe.MoEBalanceTracker`; then f uses them
            and ``expert_ids`` is ignored. Requires ``num_tokens``.
        num_tokens: The number of tokens ``counts`` were taken over.

    Returns:
        A float32 scalar; differentiable with respect to the logits (through P only).

    Raises:
        ValueError: ``top_k`` outside ``[1, E]``, non-finite logits, or mismatched shapes.

    Example:
        >>> logits = torch.zeros(8, 4)  # uniform router: perfectly balanced
        >>> ids = torch.tensor([[0, 1], [2, 3]] * 4)
        >>> float(load_balancing_loss(logits, 2, expert_ids=ids))
        2.0
    """
    layers = _as_layers(router_logits)
    n = len(layers)

    def per_layer(arg: torch.Tensor | Sequence[torch.Tensor] | None, name: str) -> list[torch.Tensor | None]:
        if arg is None:
            return [None] * n
        items = [arg] if isinstance(arg, torch.Tensor) else list(arg)
        if len(items) != n:
            raise ValueError(f"{name} has {len(items)} layers but router_logits has {n}")
        return list(items)

    ids_list, counts_list = per_layer(expert_ids, "expert_ids"), per_layer(counts, "counts")
    losses = []
    for logits, ids, cnt in zip(layers, ids_list, counts_list):
        check_top_k(top_k, logits.shape[-1])
        check_finite(logits)
        mask = _flat_mask(attention_mask, logits.shape[0], logits.device)
        losses.append(_layer_loss(logits, top_k, ids, mask, cnt, num_tokens))
    return torch.stack(losses).mean()


def router_z_loss(router_logits: LogitsArg, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over (unmasked) tokens of ``logsumexp(logits)^2``, in float32.

    Args:
        router_logits: ``[T, E]`` (or ``[B, L, E]``), or a sequence of them (mean over layers).
        attention_mask: ``T`` entries, 0 for padding.

    Returns:
        A float32 scalar.

    Example:
        >>> float(router_z_loss(torch.zeros(3, 4)))  # logsumexp = log 4
        1.921812...
    """
    losses = []
    for logits in _as_layers(router_logits):
        check_finite(logits)
        z = torch.logsumexp(logits.float(), dim=-1).square()  # [T]
        mask = _flat_mask(attention_mask, logits.shape[0], logits.device)
        if mask is None:
            losses.append(z.mean())
        else:
            losses.append((z * mask).sum() / mask.sum().clamp_min(1.0))
    return torch.stack(losses).mean()
