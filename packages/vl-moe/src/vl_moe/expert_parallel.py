"""Expert parallelism: the experts of a sparse MoE block sharded over ranks, tokens sent to them by all-to-all.

At 30B-A3B scale (128 experts per layer, REFERENCE.md section 3) gathering every expert on every rank,
as FSDP would in each layer's forward, moves more bytes than the layer computes with. Expert
parallelism (GShard, Lepikhin et al., arXiv 2006.16668; Switch, arXiv 2101.03961) keeps ``E / P``
experts on each of the ``P`` ranks of an EP group instead and moves the tokens:

1. dispatch: every (token, slot) pair routed to expert ``e`` goes to rank ``e // (E / P)``, pairs sorted
   by destination and sent with one ``all_to_all_single`` (the counts first, so the splits are known);
2. compute: each rank runs its local experts on the rows it received (the torch reference path of
   :func:`vl_moe.moe_experts`, each row one slot of weight 1);
3. combine: the outputs go back by the inverse all-to-all, are put back in (token, slot) order and summed
   with the routing weights, ``y_t = sum_j w[t, j] * expert_out[t, j]``.

Both all-to-alls are differentiable (the backward is the exchange with the splits swapped). The router
stays replicated (so the load-balancing statistics stay those of each rank's own tokens, and a
global-batch balance loss all-reduces them as before). :class:`ExpertParallelExperts` replaces a
block's ``experts`` module: the block's API, forward and state-dict keys are unchanged, and its two
parameters become DTensors ``Shard(0)`` over the EP mesh (each rank holds its ``E / P`` experts), so
``full_tensor()``, ``torch.distributed.checkpoint`` and gradient clipping see the whole tensors.

Gradients: each rank's expert gradients already sum the contributions of the tokens every rank sent
them. A data-parallel run scales each rank's loss by the world size because FSDP averages the other
gradients; the experts' gradients are divided by ``gradient_divide_factor`` (default: the EP size) to
match, as FSDP2's ``set_gradient_divide_factor`` does.

Notation: ``T`` local tokens, ``k`` slots, ``S = T k`` pairs, ``R`` rows received, ``H`` hidden, ``I`` expert
width, ``E`` experts, ``P`` EP size, ``p`` this rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .block import MoEExperts, SparseMoeBlock
from .functional import moe_experts

__all__ = ["ExpertParallelExperts", "shard_experts"]


class _AllToAllV(torch.autograd.Function):
    """Rows ``[S, ...]`` sent in ``send`` splits, ``recv`` splits received; the backward swaps the splits."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = rows.new_empty((sum(recv), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _exchange(rows: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
    out: torch.Tensor = _AllToAllV.apply(rows, send, recv, group)
    return out


class ExpertParallelExperts(nn.Module):
    """This rank's ``E / P`` experts of a block, reached by all-to-all (see the module docstring).

    Args:
        experts: The block's full :class:`~vl_moe.MoEExperts` (identical on every rank); its local slice is kept.
        mesh: A 1-D ``DeviceMesh`` of the ``P`` EP ranks (``P`` must divide ``E``).
        gradient_divide_factor: The experts' gradients are divided by this (default ``P``).

    Raises:
        ValueError: ``P`` does not divide ``E``, or the mesh is not 1-D.
    """

    def __init__(self, experts: MoEExperts, mesh: Any, *, gradient_divide_factor: float | None = None) -> None:
        super().__init__()
        from torch.distributed.tensor import Shard, distribute_tensor

        if mesh.ndim != 1:
            raise ValueError(f"expert parallelism takes a 1-D mesh of the EP ranks, got a {mesh.ndim}-D mesh")
        size = mesh.size()
        if experts.num_experts % size:
            raise ValueError(f"{experts.num_experts} experts cannot be split evenly over {size} expert-parallel ranks")
        self.mesh, self.group = mesh, mesh.get_group()
        self.size, self.rank = size, mesh.get_local_rank()
        self.num_experts, self.local_experts = experts.num_experts, experts.num_experts // size
        self.hidden_size, self.intermediate_size = experts.hidden_size, experts.intermediate_size
        self.gradient_divide_factor = float(size if gradient_divide_factor is None else gradient_divide_factor)
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name).detach()
            shard = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)  # each rank keeps its own slice
            setattr(self, name, nn.Parameter(shard, requires_grad=getattr(experts, name).requires_grad))

    backend = "torch"
    """The local experts run the torch reference path (read by ``SparseMoeBlock.backend``)."""

    def _local(self, name: str, like: torch.Tensor) -> torch.Tensor:
        weight: torch.Tensor = getattr(self, name).to_local()
        if weight.requires_grad:
            weight = _ScaleGrad.apply(weight, 1.0 / self.gradient_divide_factor)
        # FSDP's mixed-precision policy casts the parameters it manages, not these: follow the rows' dtype
        if weight.dtype == like.dtype or torch.is_autocast_enabled(like.device.type):
            return weight
        return weight.to(like.dtype)

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, check_ids: bool = True
    ) -> torch.Tensor:
        """``x [T, H], topk_weights [T, k], topk_ids [T, k] -> [T, H]``, equal to the unsharded experts'.

        A collective over the EP group: every rank must call it (with its own tokens, possibly none).
        """
        if check_ids and topk_ids.numel() and not 0 <= int(topk_ids.min()) <= int(topk_ids.max()) < self.num_experts:
            raise ValueError(f"topk_ids must lie in [0, {self.num_experts}), got {topk_ids.min()}..{topk_ids.max()}")
        tokens, k = topk_ids.shape
        flat_ids = topk_ids.reshape(-1)
        dest = torch.div(flat_ids, self.local_experts, rounding_mode="floor")
        order = torch.sort(dest, stable=True).indices
        send_counts = torch.bincount(dest, minlength=self.size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        # the ids travel without gradients; the rows with them
        local_ids = _exchange((flat_ids[order] % self.local_experts)[:, None], send, recv, self.group).detach()
        rows = _exchange(x[order // k], send, recv, self.group)
        w_gate_up, w_down = self._local("gate_up_proj", rows), self._local("down_proj", rows)
        if rows.shape[0]:
            ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
            out = moe_experts(rows, ones, local_ids, w_gate_up, w_down, backend="torch", check_ids=False)
        else:  # nothing routed here: the experts still get a (zero) gradient, as on every other rank
            out = rows + 0.0 * (w_gate_up.sum() + w_down.sum()).to(rows.dtype)
        back = _exchange(out, recv, send, self.group)  # [S, H] in destination order
        pairs = torch.empty_like(back).index_copy(0, order, back).view(tokens, k, -1)
        return (pairs * topk_weights.to(pairs.dtype)[..., None]).sum(1)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, local_experts={self.local_experts}, ranks={self.size}, "
            f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"
        )


def shard_experts(module: nn.Module, mesh: Any, *, gradient_divide_factor: float | None = None) -> list[str]:
    """Replace the ``experts`` of every :class:`~vl_moe.SparseMoeBlock` in ``module`` by :class:`ExpertParallelExperts`.

    Every rank must hold the same weights before (same seed or checkpoint); each keeps its ``E / P`` experts.

    Args:
        module: A block, a decoder, or a whole model.
        mesh: The 1-D EP ``DeviceMesh``.
        gradient_divide_factor: See :class:`ExpertParallelExperts`.

    Returns:
        The names of the blocks sharded.
    """
    names = []
    for name, block in module.named_modules():
        if isinstance(block, SparseMoeBlock) and isinstance(block.experts, MoEExperts):
            block.experts = ExpertParallelExperts(  # type: ignore[assignment]
                block.experts, mesh, gradient_divide_factor=gradient_divide_factor
            )
            names.append(name)
    return names
