"""Fused Triton rotary embedding for queries and keys, with backward.

Implements the same rotation as :func:`vl_rope.apply.apply_rotary` (RoFormer,
arXiv 2104.09864, section 3.4; ``"neox"`` rotate-half and ``"gptj"``
adjacent-pair layouts, partial rotary) as one kernel launch that rotates ``q``
and ``k`` together, reading each token's angles once. Arithmetic is float32
and each output is rounded once to its input's dtype. The backward pass is the
same kernel rotating by ``-theta``.

Triton is optional (``pip install vl-rope[triton]``): this module imports
without it and raises a clear :class:`ImportError` only when the fused
function is called. The kernels themselves live in the private module
``vl_rope._triton_rotary_kernel``, imported on the first call; Triton chooses
between its compiler and its CPU interpreter at that import, so
``TRITON_INTERPRET=1`` must be set before the first call to run on CPU.

Notation: ``B`` batch, ``H`` heads (``Hq`` for queries, ``Hk`` for keys), ``L``
sequence, ``N`` packed tokens, ``D`` head dim, ``R`` rotary dims (<= D).
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any

import torch

from vl_rope.apply import RotaryStyle, apply_rotary

try:
    import triton
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False
else:
    HAS_TRITON = True

__all__ = ["HAS_TRITON", "apply_rotary_fused"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_TILE = 4096  # elements per [BLOCK_H, BLOCK_R2] tile


def _kernels() -> ModuleType:
    """Import the kernel module on first use, with an actionable message when Triton is missing."""
    if not HAS_TRITON:
        raise ImportError(
            "apply_rotary_fused needs Triton, which is not installed: `pip install vl-rope[triton]` "
            "(or use vl_rope.apply.apply_rotary, the pure-torch version)"
        )
    from vl_rope import _triton_rotary_kernel

    return _triton_rotary_kernel


def _head_dim_index(ndim: int, unsqueeze_dim: int) -> int:
    """Normalise ``unsqueeze_dim`` (as passed to ``cos.unsqueeze``) to the index of the head dim in ``q``."""
    if not -ndim <= unsqueeze_dim < ndim - 1:
        raise ValueError(
            f"unsqueeze_dim={unsqueeze_dim} does not name a head dim of {ndim}-D q/k (the last dim is the head dim D)"
        )
    return unsqueeze_dim + ndim if unsqueeze_dim < 0 else unsqueeze_dim


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head: int) -> list[int]:
    """Validate the inputs and return the token shape (every dim of ``q`` but the head dim and ``D``)."""
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    rot = cos.shape[-1]
    if rot > q.shape[-1]:
        raise ValueError(f"q/k have head dim {q.shape[-1]} but cos/sin have {rot} rotary dims (must be <= head dim)")
    if rot % 2:
        raise ValueError(f"the rotary dim must be even, got {rot}")
    tokens = [n for i, n in enumerate(q.shape[:-1]) if i != head]
    k_tokens = [n for i, n in enumerate(k.shape[:-1]) if i != head]
    if tokens != k_tokens:
        raise ValueError(f"q and k differ outside the head dim: {tuple(q.shape)} and {tuple(k.shape)}")
    if cos.ndim != q.ndim - 1 or any(c not in (1, n) for c, n in zip(cos.shape[:-1], tokens, strict=True)):
        raise ValueError(
            f"cos/sin of shape {tuple(cos.shape)} do not broadcast to the token dims {tuple(tokens)} of q "
            f"{tuple(q.shape)} with the head dim at {head}"
        )
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"all inputs must be on one device, got q on {q.device} and {name} on {t.device}")
    return tokens


def _canonical(x: torch.Tensor, head: int) -> torch.Tensor:
    """View ``x`` as ``[T0, T1, H, D]`` (no copy): token dims first, then heads, then the head dim."""
    order = [i for i in range(x.ndim - 1) if i != head] + [head, x.ndim - 1]
    x = x.permute(order)
    return x.unsqueeze(0) if x.ndim == 3 else x


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    gptj: bool,
    conj: bool,
    head: int,
    tokens: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel once over ``q`` and ``k``; outputs keep the inputs' memory layout when it is dense."""
    kern = _kernels()
    if not kern.INTERPRET and q.device.type != "cuda":
        raise RuntimeError(
            f"apply_rotary_fused runs on CUDA tensors, got {q.device.type}; to run Triton's CPU interpreter set "
            "TRITON_INTERPRET=1 before the first call, or use vl_rope.apply.apply_rotary"
        )
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    n_tokens = 1
    for n in tokens:
        n_tokens *= n
    if n_tokens == 0:
        return q_out, k_out
    rot = cos.shape[-1]
    cq, ck, cqo, cko = (_canonical(t, head) for t in (q, k, q_out, k_out))
    cc, cs = (t.expand(*tokens, rot) for t in (cos, sin))
    if cc.ndim == 2:
        cc, cs = cc.unsqueeze(0), cs.unsqueeze(0)
    t1 = cq.shape[1]
    r2 = rot // 2
    d_pass = q.shape[-1] - rot
    block_r2 = triton.next_power_of_2(r2)
    block_h = max(1, min(triton.next_power_of_2(max(cq.shape[2], ck.shape[2])), _MAX_TILE // block_r2))
    block_p = triton.next_power_of_2(max(d_pass, 1))
    grid = (n_tokens,)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        kern.rotary_kernel[grid](
            cq, ck, cqo, cko, cc, cs,
            t1, cq.shape[2], ck.shape[2], r2, d_pass,
            *cq.stride(), *ck.stride(), *cqo.stride(), *cko.stride(), *cc.stride(), *cs.stride(),
            GPTJ=gptj,
            CONJ=conj,
            ROUND_Q=q.dtype != torch.float32,
            ROUND_K=k.dtype != torch.float32,
            HAS_PASS=d_pass > 0,
            BLOCK_H=block_h,
            BLOCK_R2=block_r2,
            BLOCK_P=block_p,
            num_warps=4 if block_h * block_r2 <= 2048 else 8,
        )  # fmt: skip
    return q_out, k_out


class _FusedRotary(torch.autograd.Function):
    """Autograd wrapper: the backward of a rotation by ``theta`` is the rotation by ``-theta``."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        gptj: bool,
        head: int,
        tokens: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        ctx.gptj, ctx.head, ctx.tokens = gptj, head, tokens
        out_q, out_k = _launch(q, k, cos, sin, gptj=gptj, conj=False, head=head, tokens=tokens)
        for x, out in ((q, out_q), (k, out_k)):
            if not x.requires_grad:  # as in eager torch: an output only requires grad if its input does
                ctx.mark_non_differentiable(out)
        return out_q, out_k

    @staticmethod
    def backward(ctx: Any, grad_q: torch.Tensor, grad_k: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        dq, dk = _launch(grad_q, grad_k, cos, sin, gptj=ctx.gptj, conj=True, head=ctx.head, tokens=ctx.tokens)
        return (dq if ctx.needs_input_grad[0] else None), (dk if ctx.needs_input_grad[1] else None), *(None,) * 5


def apply_rotary_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    style: RotaryStyle = "neox",
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys with one fused Triton kernel (forward and backward).

    Same semantics as :func:`vl_rope.apply.apply_rotary` with ``upcast=True``:
    the rotation is computed in float32 and each result is rounded once to its
    input's dtype (float32, float16 or bfloat16).

    Layout assumption on ``cos``/``sin``: the kernel reads only one value per
    rotary pair, so they must have the layout produced by the RoPE modules.
    For ``"neox"``, ``cos = cat(f, f)`` and only the first ``R/2`` entries are
    read; for ``"gptj"``, ``cos = f.repeat_interleave(2)`` and only the even
    entries are read. Other layouts give wrong results silently (use
    :func:`~vl_rope.apply.apply_rotary` for those).

    Strides: ``q``, ``k``, ``cos`` and ``sin`` may have arbitrary strides (e.g.
    ``q`` a transposed view of a projection output, or ``cos`` broadcast over
    the batch); they are passed to the kernel and nothing is copied. The
    outputs have the inputs' memory layout when that layout is dense
    (``torch.empty_like``), else they are contiguous.

    Devices: CUDA tensors; CPU tensors only under Triton's interpreter
    (``TRITON_INTERPRET=1`` set before the first call), which is for testing.
    CPU tensors without the interpreter raise :class:`RuntimeError`.

    Gradients flow to ``q`` and ``k``. If ``cos`` or ``sin`` requires grad,
    the call falls back to the torch :func:`~vl_rope.apply.apply_rotary`
    (``upcast=True``) so that their gradients are correct too.

    Args:
        q: Queries ``[B, Hq, L, D]`` (``unsqueeze_dim=1``), ``[B, L, Hq, D]``
            (``unsqueeze_dim=2``) or ``[N, Hq, D]`` (``unsqueeze_dim=1``).
        k: Keys in the layout of ``q``, with ``Hk`` heads (``Hk`` may differ
            from ``Hq``, as in GQA) and the same head dim ``D``.
        cos: Cosines ``[B, L, R]`` (or ``[N, R]``); dims of size 1 broadcast.
            ``R <= D`` must be even; if ``R < D`` the leading ``R`` dims rotate
            and the rest is copied through (partial rotary).
        sin: Sines, same shape as ``cos``.
        style: ``"neox"`` (rotate-half, Qwen) or ``"gptj"`` (adjacent pairs, GLM).
        unsqueeze_dim: Index of the head dim in ``q``/``k``, as passed to
            ``cos.unsqueeze`` by :func:`~vl_rope.apply.apply_rotary`.

    Returns:
        The rotated ``(q, k)``, in the dtypes of the inputs.

    Raises:
        ValueError: On mismatched shapes (cos vs sin, q vs k, ``R > D``, odd
            ``R``), an unknown style, or an unsupported dtype or device mix.
        ImportError: If Triton is not installed.
        RuntimeError: On non-CUDA tensors outside the Triton interpreter.
    """
    if style not in ("neox", "gptj"):
        raise ValueError(f"style must be 'neox' or 'gptj', got {style!r}")
    if q.ndim not in (3, 4) or k.ndim != q.ndim:
        raise ValueError(f"q and k must both be 3-D [N, H, D] or 4-D, got {q.ndim}-D and {k.ndim}-D")
    head = _head_dim_index(q.ndim, unsqueeze_dim)
    tokens = _check(q, k, cos, sin, head)
    if cos.requires_grad or sin.requires_grad or cos.shape[-1] == 0:
        return apply_rotary(q, k, cos, sin, style=style, unsqueeze_dim=unsqueeze_dim, upcast=True)
    gptj = style == "gptj"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        out: tuple[torch.Tensor, torch.Tensor] = _FusedRotary.apply(q, k, cos, sin, gptj, head, tokens)
        return out
    return _launch(q, k, cos, sin, gptj=gptj, conj=False, head=head, tokens=tokens)
