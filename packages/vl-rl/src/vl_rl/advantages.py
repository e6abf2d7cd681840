"""Group-relative advantages for GRPO-family methods.

Implements the outcome advantages of GRPO (DeepSeekMath, arXiv 2402.03300, section 4.1.2) and
Dr. GRPO (arXiv 2503.20783, section 3.2), plus the batch-scaled variant (the reward
standard deviation taken over the whole batch instead of each group).

Notation:
    N: number of prompts (groups); G: responses per prompt (group size).
    R [N, G]: scalar reward of response j to prompt i.
    mean_i, std_i: mean and **sample** (Bessel-corrected, divisor G - 1) standard deviation of
        group i, as ``torch.std`` and TRL's GRPO compute them.
    A [N, G]: advantage of each response; every token of a response shares it.

Scales:
    ``"group"`` (GRPO):   A = (R - mean_i) / (std_i + eps)
    ``"batch"``:          A = (R - mean_i) / (std over all N * G rewards + eps)
    ``"none"`` (Dr. GRPO): A = R - mean_i

A group whose rewards are all equal carries no learning signal: its advantages are exactly zero
(forced, not left to floating-point cancellation), never NaN. A group of size 1 has no baseline
and would always give zeros, which in practice means a misconfigured sampler, so it is an error.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["AdvantageScale", "group_advantages"]

AdvantageScale = Literal["group", "batch", "none"]
_SCALES = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor,
    scale: AdvantageScale = "group",
    eps: float = 1e-6,
    *,
    group_size: int | None = None,
) -> torch.Tensor:
    """Advantages of each response relative to the other responses to the same prompt.

    Args:
        rewards: ``[N, G]`` rewards, one row per prompt; or a flat ``[N * G]`` tensor with
            ``group_size`` given (consecutive runs of ``group_size`` share a prompt). Any real or
            integer/bool dtype; computed in float32 (float64 stays float64).
        scale: ``"group"`` divides by each group's sample std, ``"batch"`` by the sample std of
            all rewards, ``"none"`` only subtracts the group mean (Dr. GRPO).
        eps: added to the std before dividing; keeps near-constant groups finite.
        group_size: G for a flat ``rewards``; must equal ``rewards.shape[1]`` when both are given.

    Returns:
        Advantages with the shape of ``rewards`` (``[N, G]`` or ``[N * G]``).

    Raises:
        ValueError: for a wrong scale, a negative eps, a shape that does not split into groups,
            a group size below 2, or NaN/inf rewards.
    """
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    flat = rewards.dim() == 1
    if flat:
        if group_size is None:
            raise ValueError(f"a flat rewards tensor of shape {tuple(rewards.shape)} needs group_size")
        if group_size < 1 or rewards.numel() % group_size != 0:
            raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
        grouped = rewards.reshape(-1, group_size)
    elif rewards.dim() == 2:
        if group_size is not None and group_size != rewards.shape[1]:
            raise ValueError(f"group_size={group_size} disagrees with rewards of shape {tuple(rewards.shape)}")
        grouped = rewards
    else:
        raise ValueError(f"rewards must be [N, G] or flat [N * G], got shape {tuple(rewards.shape)}")
    g = grouped.shape[1]
    if g < 2:
        raise ValueError(
            f"group size G={g} leaves no baseline: every advantage would be 0 and nothing would be learned; "
            "sample at least 2 responses per prompt"
        )
    dtype = torch.promote_types(grouped.dtype, torch.float32) if grouped.is_floating_point() else torch.float32
    r = grouped.to(dtype)
    bad = int((~torch.isfinite(r)).sum())
    if bad:
        raise ValueError(f"rewards contain {bad} NaN/inf values (of {r.numel()})")

    centered = r - r.mean(dim=1, keepdim=True)
    # Forced zeros: the mean of equal floats need not reproduce them exactly (0.1 * 3 / 3 != 0.1).
    constant = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    centered = centered.masked_fill(constant, 0.0)
    if scale == "group":
        adv = centered / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        # g >= 2 here, so the sample std over all rewards is defined.
        adv = centered / (r.std() + eps)
    else:
        adv = centered
    # eps = 0 with a constant group would give 0 / 0; the forced zero wins.
    adv = adv.masked_fill(constant, 0.0)
    return adv.reshape(-1) if flat else adv
