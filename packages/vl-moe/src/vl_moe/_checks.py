"""Input validation shared by the router, the losses and the experts (clear ``ValueError`` messages).

Every check names the offending argument and both numbers (shapes, dtypes, sizes). Checks that need
the tensor's values (finiteness, id ranges) are skipped while ``torch.compile`` traces, where a
data-dependent branch would break the graph.

Notation: ``T`` tokens, ``H`` hidden size, ``E`` experts, ``k`` experts per token, ``I`` expert width.
"""

from __future__ import annotations

import torch

__all__ = ["check_experts_inputs", "check_finite", "check_top_k"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def check_top_k(top_k: int, num_experts: int) -> None:
    """Require ``1 <= top_k <= num_experts``."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")


def check_finite(logits: torch.Tensor, name: str = "router_logits") -> None:
    """Raise if ``logits`` holds NaN or infinite values (skipped under ``torch.compile``)."""
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
    if _compiling():
        return
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite values (NaN or inf) out of {logits.numel()}; "
            "check the hidden states and the router weight"
        )


def check_experts_inputs(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    check_ids: bool = True,
) -> None:
    """Validate the arguments of :func:`vl_moe.moe_experts` (shapes, dtypes, devices; id range if ``check_ids``).

    Args:
        x: Tokens ``[T, H]``.
        topk_weights: Routing weights ``[T, k]`` (any floating dtype).
        topk_ids: Expert ids ``[T, k]`` (integer dtype).
        w_gate_up: ``[E, 2I, H]``, gate rows first; same dtype as ``x``.
        w_down: ``[E, H, I]``; same dtype as ``x``.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H] (2-D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    if w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(
            f"w_gate_up must be [E, 2I, H] and w_down [E, H, I] (3-D), got shapes "
            f"{tuple(w_gate_up.shape)} and {tuple(w_down.shape)}"
        )
    num_tokens, hidden = x.shape
    num_experts, two_i, hidden_w = w_gate_up.shape
    if hidden_w != hidden:
        raise ValueError(
            f"w_gate_up {tuple(w_gate_up.shape)} must be [E, 2I, H] with H = x's hidden size {hidden}, got H = {hidden_w}"
        )
    if two_i % 2:
        raise ValueError(f"w_gate_up's second dim is 2I (gate then up) and must be even, got {two_i}")
    expected_down = (num_experts, hidden, two_i // 2)
    if tuple(w_down.shape) != expected_down:
        raise ValueError(
            f"w_down must be [E, H, I] = {expected_down} to match w_gate_up {tuple(w_gate_up.shape)} and x "
            f"{tuple(x.shape)}, got {tuple(w_down.shape)}"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(
            f"topk_ids must be [T, k] with T = {num_tokens} (x {tuple(x.shape)}), got {tuple(topk_ids.shape)}"
        )
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights and topk_ids must have the same shape [T, k], got {tuple(topk_weights.shape)} and "
            f"{tuple(topk_ids.shape)}"
        )
    check_top_k(topk_ids.shape[1], num_experts)
    if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must have an integer dtype, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be floating point, got dtype {topk_weights.dtype}")
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {w.dtype} but x has dtype {x.dtype}; cast one of them")
    devices = {t.device for t in (x, topk_weights, topk_ids, w_gate_up, w_down)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    if not check_ids or _compiling() or topk_ids.numel() == 0:
        return
    bounds = torch.aminmax(topk_ids)  # one host synchronisation
    lo, hi = int(bounds.min), int(bounds.max)
    if lo < 0 or hi >= num_experts:
        raise ValueError(
            f"topk_ids must lie in [0, {num_experts}) for {num_experts} experts, got values in [{lo}, {hi}]"
        )
