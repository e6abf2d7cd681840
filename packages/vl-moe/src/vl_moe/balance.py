"""Global-batch load balancing: expert counts accumulated over micro-batches and all-reduced over ranks.

Implements the global-batch load-balancing loss of Qiu et al., "Demons in the Detail" (arXiv
2501.11873, section 3): the selection frequency ``f`` of every expert is taken over the global batch
(every micro-batch of the step, every data-parallel rank) rather than one micro-batch, which lets
experts specialise by domain; ``P`` (mean router probability) stays local and carries the gradient.

Usage per training step, per MoE layer ``l``::

    tracker.add(topk_ids, attention_mask, layer=l)  # for every micro-batch (no gradient involved)
    loss = tracker.loss(router_logits, attention_mask, layer=l)  # uses the counts gathered so far

When every micro-batch is added before the losses are computed (e.g. the loss is taken after all
forwards, or the forwards are replayed), the token-weighted mean of the micro-batch losses equals the
loss of one big batch exactly. With a loss per micro-batch right after its forward, the counts are
those seen so far in the step: the running approximation the paper's buffer implements.

Notation: ``E`` experts, ``k`` experts per token, ``L`` MoE layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .losses import expert_counts, load_balancing_loss

__all__ = ["MoEBalanceTracker"]


class MoEBalanceTracker:
    """Accumulate per-layer expert counts over micro-batches; all-reduce them across ranks on demand.

    Args:
        num_experts: ``E``.
        top_k: ``k``.
        num_layers: Number of MoE layers tracked (counts are kept per layer).
        process_group: The data-parallel group for ``torch.distributed.all_reduce`` (used when
            ``torch.distributed`` is initialised and no ``all_reduce`` hook is given).
        all_reduce: Optional hook ``fn(tensor)`` that sums a tensor in place across ranks (for custom
            communication, or to simulate ranks in tests). It receives one float32 tensor ``[L, E + 1]``:
            the counts and, in the last column, the token count.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        *,
        num_layers: int = 1,
        process_group: object | None = None,
        all_reduce: Callable[[torch.Tensor], object] | None = None,
    ) -> None:
        if top_k > num_experts or top_k < 1:
            raise ValueError(f"top_k ({top_k}) must be in [1, num_experts ({num_experts})]")
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_layers = num_layers
        self.process_group = process_group
        self._all_reduce = all_reduce
        self._local: torch.Tensor | None = None  # [L, E + 1]: counts, then tokens
        self._global: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget all counts (call at the start of each optimiser step)."""
        self._local = None
        self._global = None

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")

    def add(self, topk_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, layer: int = 0) -> None:
        """Count one micro-batch's assignments ``topk_ids [T, k]`` (padding excluded by ``attention_mask``)."""
        self._check_layer(layer)
        if topk_ids.shape[-1] != self.top_k:
            raise ValueError(
                f"topk_ids has {topk_ids.shape[-1]} slots per token but the tracker's top_k is {self.top_k}"
            )
        counts, tokens = expert_counts(topk_ids.detach(), self.num_experts, attention_mask)
        if self._local is None:
            self._local = torch.zeros(self.num_layers, self.num_experts + 1, device=counts.device)
        self._local[layer, :-1] += counts
        self._local[layer, -1] += tokens
        self._global = None

    def global_counts(self, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts [E], num_tokens [])`` summed over the micro-batches added and over all ranks."""
        self._check_layer(layer)
        if self._local is None:
            raise ValueError("no counts yet: call add(topk_ids, ...) for at least one micro-batch first")
        if self._global is None:
            summed = self._local.clone()
            if self._all_reduce is not None:
                self._all_reduce(summed)
            elif torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(summed, group=self.process_group)
            self._global = summed
        return self._global[layer, :-1], self._global[layer, -1]

    def fractions(self, layer: int = 0) -> torch.Tensor:
        """Global ``f [E]`` (sums to ``k``)."""
        counts, tokens = self.global_counts(layer)
        return counts / tokens.clamp_min(1.0)

    def loss(
        self, router_logits: torch.Tensor, attention_mask: torch.Tensor | None = None, *, layer: int = 0
    ) -> torch.Tensor:
        """``E * sum_e f_e^global P_e^local`` for one micro-batch's ``router_logits [T, E]`` of ``layer``."""
        counts, tokens = self.global_counts(layer)
        return load_balancing_loss(
            router_logits, self.top_k, attention_mask=attention_mask, counts=counts, num_tokens=tokens
        )
