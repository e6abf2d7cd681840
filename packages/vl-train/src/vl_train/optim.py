"""AdamW with one parameter group per model part and a linear-warm-up + cosine-decay schedule.

Qwen3-VL trains the vision tower, the merger and the LLM at different rates in some stages
(REFERENCE.md section 4); here every part gets its own peak rate (``OptimConfig.part_lr``), and
inside a part biases and norm weights (1-D parameters) get no weight decay, as is usual for AdamW
(Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019).

Schedule (``s`` the optimiser step, ``W`` warm-up steps, ``T`` total steps, ``r`` ``min_lr_ratio``):

- ``s < W``: ``f(s) = (s + 1) / W`` (the first step already moves the weights);
- otherwise ``p = min((s - W) / (T - W), 1)`` (``1`` when ``T <= W``) and
  ``f(s) = r + (1 - r) * (1 + cos(pi p)) / 2``.

The learning rate of a group at step ``s`` is its peak rate times ``f(s)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vl_model.parts import part_parameters

from .config import PARTS, OptimConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor", "param_groups"]


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The multiplier ``f(step)`` of the peak learning rate (see the module docstring).

    Raises:
        ValueError: A negative step, negative warm-up or ``min_lr_ratio`` outside ``[0, 1]``.
    """
    if step < 0 or warmup_steps < 0 or max_steps < 1:
        raise ValueError(f"need step >= 0, warmup_steps >= 0, max_steps >= 1; got {step}, {warmup_steps}, {max_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max_steps - warmup_steps
    progress = 1.0 if span <= 0 else min((step - warmup_steps) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norm scales and similar vectors: decaying them only shrinks activations.
    return param.dim() < 2 or "norm" in name.lower()


def param_groups(model: nn.Module, config: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups: for each trainable part, one group with decay and one without.

    Only parameters with ``requires_grad`` are included (freeze parts first). Each group carries
    ``part``, ``lr`` (the part's peak rate), ``initial_lr`` and ``weight_decay``. Trainable parameters
    outside every part (rare: e.g. an added head) go into a group ``"other"`` at ``config.lr``.

    Raises:
        ValueError: Nothing is trainable.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    seen: set[int] = set()
    groups: list[dict[str, Any]] = []

    def add(part: str, lr: float, params: list[nn.Parameter]) -> None:
        for decay in (True, False):
            chosen = [p for p in params if _no_decay(names.get(id(p), ""), p) != decay]
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "part": part,
                        "lr": lr,
                        "initial_lr": lr,
                        "weight_decay": config.weight_decay if decay else 0.0,
                    }
                )

    for part in PARTS:
        params = [p for p in part_parameters(model, part) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        add(part, config.part_lr(part), params)
    add("other", config.lr, [p for p in model.parameters() if p.requires_grad and id(p) not in seen])
    if not groups:
        raise ValueError("no trainable parameters (every part is frozen); nothing to optimise")
    return groups


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over :func:`param_groups` with the config's betas and epsilon."""
    return torch.optim.AdamW(param_groups(model, config), lr=config.lr, betas=config.betas, eps=config.eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` over ``max_steps`` to every group's peak rate (step 0 is already scaled)."""

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=config.warmup_steps, max_steps=max_steps, min_lr_ratio=config.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
