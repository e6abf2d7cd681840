"""Functional entry point of the routed experts: validation, then the torch path or the Triton kernels.

``moe_experts`` takes the routing decision from any router (ours, a project's own, a checkpoint's) and
computes the SwiGLU experts of Qwen3-VL-MoE (arXiv 2511.21631; see :mod:`vl_moe.torch_experts` for
the formula). Backends:

- ``"torch"``: :func:`vl_moe.torch_experts.torch_moe_experts` (any device, any float dtype);
- ``"triton"``: ``vl_moe.kernels.triton_moe_experts`` (imported on first use, so ``vl_moe`` itself
  imports without Triton);
- ``"auto"``: Triton for CUDA tensors when Triton is installed, torch otherwise.

Notation: ``T`` tokens, ``H`` hidden, ``I`` expert width, ``E`` experts, ``k`` experts per token.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from typing import Literal

import torch

from ._checks import check_experts_inputs
from .torch_experts import torch_moe_experts

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

__all__ = ["BACKENDS", "Backend", "moe_experts", "resolve_backend"]


@cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> Literal["torch", "triton"]:
    """The backend ``"auto"`` stands for on ``device`` (Triton on CUDA when installed, else torch).

    Raises:
        ValueError: An unknown backend name.
    """
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_installed() else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def moe_experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    backend: Backend | str = "auto",
    check_ids: bool = True,
) -> torch.Tensor:
    """Apply the routed SwiGLU experts: ``y_t = sum_j w[t, j] * expert_{ids[t, j]}(x_t)``.

    Args:
        x: Tokens ``[T, H]``.
        topk_weights: Routing weights ``[T, k]`` (any float dtype; cast to ``x.dtype`` by the torch path).
        topk_ids: Expert ids ``[T, k]`` (integer dtype) in ``[0, E)``.
        w_gate_up: ``[E, 2I, H]`` with the gate rows first (transformers 5.x in-memory layout); same
            dtype as ``x``.
        w_down: ``[E, H, I]``; same dtype as ``x``.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"`` or ``"triton"``.
        check_ids: Check that every id lies in ``[0, E)`` (a device synchronisation); pass ``False``
            when the ids come straight from :func:`vl_moe.route`, as :class:`vl_moe.SparseMoeBlock` does.

    Returns:
        ``[T, H]`` in ``x.dtype``, differentiable with respect to ``x``, ``topk_weights``,
        ``w_gate_up`` and ``w_down``.

    Raises:
        ValueError: Mismatched shapes, ``k > E``, ids out of range, non-integer ids, dtypes of ``x``
            and the expert weights that differ, tensors on different devices, unknown backend.
        ImportError: ``backend="triton"`` without Triton or without the ``vl_moe.kernels`` package.

    Example:
        >>> T, H, I, E, k = 5, 8, 4, 3, 2
        >>> x = torch.randn(T, H)
        >>> weights, ids = torch.full((T, k), 0.5), torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1], [1, 2]])
        >>> y = moe_experts(x, weights, ids, torch.randn(E, 2 * I, H), torch.randn(E, H, I), backend="torch")
        >>> y.shape
        torch.Size([5, 8])
    """
    resolved = resolve_backend(backend, x.device)
    check_experts_inputs(x, topk_weights, topk_ids, w_gate_up, w_down, check_ids=check_ids)
    if resolved == "triton":
        try:
            from vl_moe.kernels import triton_moe_experts
        except ImportError as err:
            raise ImportError(
                "backend='triton' needs triton and the vl_moe.kernels package; use backend='torch' instead"
            ) from err
        # The ids were range-checked above when check_ids asked for it: no second host synchronisation.
        return triton_moe_experts(x, topk_weights, topk_ids, w_gate_up, w_down, validate_ids=False)
    return torch_moe_experts(x, topk_weights, topk_ids, w_gate_up, w_down)
