"""The sparse MoE block of Qwen3-VL-MoE: top-k router plus SwiGLU routed experts (no shared expert).

Follows the Qwen3-VL technical report (arXiv 2511.21631, the MoE variants 30B-A3B / 235B-A22B): the
router picks ``k`` of ``E`` experts per token from an fp32 softmax, renormalises their weights, and
the token's output is the weighted sum of those experts' SwiGLU MLPs.

State-dict keys equal transformers 5.x's ``Qwen3VLMoeTextSparseMoeBlock`` (in-memory layout), so
weights load with ``load_state_dict(strict=True)`` in either direction:

- ``gate.weight [E, H]``
- ``experts.gate_up_proj [E, 2I, H]`` (gate rows first)
- ``experts.down_proj [E, H, I]``

Notation: ``B`` batch, ``L`` sequence, ``T`` tokens, ``H`` hidden, ``I`` expert width, ``E`` experts,
``k`` experts per token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ._checks import check_top_k
from .functional import BACKENDS, Backend, moe_experts
from .router import TopKRouter

__all__ = ["MoEExperts", "MoEOutput", "SparseMoeBlock"]


class MoEOutput(NamedTuple):
    """What :meth:`SparseMoeBlock.forward_with_router` returns.

    Attributes:
        hidden_states: ``[..., H]``, the input's shape.
        router_logits: ``[T, E]`` (for :func:`vl_moe.load_balancing_loss` and :func:`vl_moe.router_z_loss`).
        topk_weights: ``[T, k]``.
        topk_ids: ``[T, k]`` (int64).
    """

    hidden_states: torch.Tensor
    router_logits: torch.Tensor
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor


class MoEExperts(nn.Module):
    """The ``E`` SwiGLU experts as two 3-D parameters (``gate_up_proj``, ``down_proj``).

    Args:
        hidden_size: ``H``.
        intermediate_size: ``I``, the width of one expert.
        num_experts: ``E``.
        backend: See :func:`vl_moe.moe_experts`.
        init_std: Standard deviation of the normal initialisation (Qwen3-VL's ``initializer_range``).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        *,
        backend: Backend | str = "auto",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.backend = backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=init_std)
        nn.init.normal_(self.down_proj, std=init_std)

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, check_ids: bool = True
    ) -> torch.Tensor:
        """``x [T, H], topk_weights [T, k], topk_ids [T, k] -> [T, H]`` (``check_ids``: see :func:`vl_moe.moe_experts`)."""
        return moe_experts(
            x, topk_weights, topk_ids, self.gate_up_proj, self.down_proj, backend=self.backend, check_ids=check_ids
        )

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, backend={self.backend!r}"
        )


class SparseMoeBlock(nn.Module):
    """Router plus routed experts; a drop-in for transformers' ``Qwen3VLMoeTextSparseMoeBlock``.

    Args:
        hidden_size: ``H``.
        intermediate_size: ``I`` (Qwen3-VL-MoE's ``moe_intermediate_size``).
        num_experts: ``E``.
        top_k: ``k`` (``num_experts_per_tok``), ``1 <= k <= E``.
        backend: ``"auto"`` (Triton kernels on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
        renormalize: Renormalise the k routing weights to sum 1 (``norm_topk_prob``).
        init_std: Normal initialisation of all three weights.

    Example:
        >>> block = SparseMoeBlock(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2)
        >>> sorted(block.state_dict())
        ['experts.down_proj', 'experts.gate_up_proj', 'gate.weight']
        >>> block(torch.randn(2, 3, 16)).shape
        torch.Size([2, 3, 16])
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        backend: Backend | str = "auto",
        *,
        renormalize: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        check_top_k(top_k, num_experts)
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = TopKRouter(hidden_size, num_experts, top_k, renormalize=renormalize)
        nn.init.normal_(self.gate.weight, std=init_std)
        self.experts = MoEExperts(hidden_size, intermediate_size, num_experts, backend=backend, init_std=init_std)

    @property
    def backend(self) -> str:
        """The experts' backend name (settable)."""
        return self.experts.backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self.experts.backend = value

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Route and apply the experts: ``[..., H] -> [..., H]`` (e.g. ``[B, L, H]``)."""
        return self.forward_with_router(hidden_states).hidden_states

    def forward_with_router(self, hidden_states: torch.Tensor) -> MoEOutput:
        """Like :meth:`forward`, also returning the router logits and the routing decision.

        Args:
            hidden_states: ``[..., H]``.

        Returns:
            :class:`MoEOutput` with ``hidden_states`` shaped like the input.
        """
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"hidden_states has hidden size {hidden_states.shape[-1]} but the block expects {self.hidden_size}"
            )
        if hidden_states.dtype != self.gate.weight.dtype:
            raise ValueError(
                f"hidden_states has dtype {hidden_states.dtype} but the block's weights have dtype "
                f"{self.gate.weight.dtype}; cast one of them"
            )
        flat = hidden_states.reshape(-1, self.hidden_size)
        logits, weights, ids = self.gate(flat)
        # The ids come from our own router: skip the range check and its device synchronisation.
        out = self.experts(flat, weights, ids, check_ids=False).view(hidden_states.shape)
        return MoEOutput(out, logits, weights, ids)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}"
