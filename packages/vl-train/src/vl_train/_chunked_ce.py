"""Chunked per-token losses over a large vocabulary: never the full ``[tokens, V]`` logits matrix.

One custom autograd Function serves cross-entropy and the distillation divergences. Its forward walks
the selected rows ``chunk`` at a time, computes each chunk's logits ``h W^T + b`` (or reads them when
the input already is logits), and keeps only the per-token losses. Its backward recomputes every
chunk's softmax and turns the closed-form gradient with respect to the logits into ``grad_hidden`` and
``grad_weight`` chunk by chunk, so peak memory is ``O(chunk x V)`` instead of ``O(N x V)`` (the idea
of Liger-Kernel's fused linear cross-entropy and Apple's Cut Cross-Entropy, arXiv 2411.09009, in
plain torch). Softmax arithmetic runs in float32 (float64 for float64 inputs).

Per-token losses on student logits ``z`` (after soft-capping and temperature), with ``p = softmax(z)``,
``s = log p``, teacher log-probabilities ``t`` (``q = exp t``) and their gradients ``dl/dz``:

- ``ce``:   ``l = logsumexp(z) - z_y``;                       ``g = p - onehot(y)``
- ``fkl``:  ``l = KL(q || p) = sum q (t - s)``;               ``g = p - q``
- ``rkl``:  ``l = KL(p || q) = sum p (s - t)``;               ``g = p (s - t - l)``
- ``jsd``:  ``m = beta q + (1 - beta) p``,
  ``l = beta KL(q || m) + (1 - beta) KL(p || m)``;            ``g = (1 - beta) p (r - <p, r>)``, ``r = s - log m``

(the JSD gradient follows from ``dl/dp_v = (1 - beta) log(p_v / m_v)`` and the softmax Jacobian).

Notation: ``N`` positions, ``n`` selected rows, ``D`` hidden size, ``V`` vocabulary, ``c`` chunk rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

__all__ = ["ChunkSpec", "chunked_token_losses"]

Kind = Literal["ce", "fkl", "rkl", "jsd"]


@dataclass(frozen=True)
class ChunkSpec:
    """What to compute per token (static, non-tensor arguments of the autograd Function).

    Args:
        kind: ``"ce"`` (target ids), ``"fkl"``, ``"rkl"`` or ``"jsd"`` (teacher logits/log-probs).
        chunk_size: Rows per chunk.
        softcap: ``z = c tanh(raw / c)`` before everything else (Gemma-style), or None.
        temperature: Student and teacher logits are divided by it (after soft-capping).
        beta: The JSD interpolation weight (``kind="jsd"`` only).
    """

    kind: Kind
    chunk_size: int = 4096
    softcap: float | None = None
    temperature: float = 1.0
    beta: float = 0.5


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _xlogy_diff(prob: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_v prob (a - b)`` with ``0 * anything = 0`` (where prob vanishes, a or b may be -inf)."""
    return torch.where(prob > 0, prob * (a - b), torch.zeros((), dtype=prob.dtype, device=prob.device)).sum(-1)


def _chunk_math(
    z: torch.Tensor, target: torch.Tensor, spec: ChunkSpec, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token losses ``[c]`` of student logits ``z [c, V]`` and, if asked, ``dl/dz [c, V]``."""
    s = torch.log_softmax(z, dim=-1)
    if spec.kind == "ce":
        loss = -s.gather(-1, target[:, None]).squeeze(-1)
        if not need_grad:
            return loss, None
        g = s.exp_()
        g[torch.arange(g.shape[0], device=g.device), target] -= 1.0
        return loss, g
    t = torch.log_softmax(target.to(z.dtype) / spec.temperature, dim=-1)
    p = s.exp()
    if spec.kind == "fkl":
        q = t.exp()
        return _xlogy_diff(q, t, s), (p - q) if need_grad else None
    if spec.kind == "rkl":
        loss = _xlogy_diff(p, s, t)
        return loss, p * (s - t - loss[:, None]) if need_grad else None
    beta = spec.beta
    log_m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
    q = t.exp()
    loss = beta * _xlogy_diff(q, t, log_m) + (1.0 - beta) * _xlogy_diff(p, s, log_m)
    if not need_grad:
        return loss, None
    r = s - log_m
    return loss, (1.0 - beta) * p * (r - (p * r).sum(-1, keepdim=True))


class _ChunkedLoss(torch.autograd.Function):
    """Per-token losses of rows ``rows`` of ``source`` (hidden states with a head, or logits)."""

    @staticmethod
    def forward(
        ctx: Any,
        source: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        rows: torch.Tensor,
        target: torch.Tensor,
        spec: ChunkSpec,
    ) -> torch.Tensor:
        dtype = _compute_dtype(source, *(w for w in (weight, bias) if w is not None))
        losses = torch.empty(rows.numel(), dtype=dtype, device=source.device)
        for start in range(0, rows.numel(), spec.chunk_size):
            idx = rows[start : start + spec.chunk_size]
            z, _ = _logits(source, weight, bias, idx, spec, dtype)
            losses[start : start + idx.numel()] = _chunk_math(z, target[idx], spec, need_grad=False)[0]
        # Only the inputs (already alive) are kept; each chunk's softmax is recomputed in backward.
        ctx.save_for_backward(source, weight, bias, rows, target)
        ctx.spec = spec
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        source, weight, bias, rows, target = ctx.saved_tensors
        spec: ChunkSpec = ctx.spec
        dtype = grad_losses.dtype
        need_src, need_w, need_b = ctx.needs_input_grad[:3]
        grad_src = torch.zeros_like(source) if need_src else None
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device) if need_b else None
        for start in range(0, rows.numel(), spec.chunk_size):
            idx = rows[start : start + spec.chunk_size]
            z, dz_draw = _logits(source, weight, bias, idx, spec, dtype)
            g = _chunk_math(z, target[idx], spec, need_grad=True)[1]
            assert g is not None
            g = g * grad_losses[start : start + idx.numel(), None]
            if dz_draw is not None:
                g = g * dz_draw
            if weight is None:  # the source already is the logits
                if grad_src is not None:
                    grad_src.index_copy_(0, idx, g.to(source.dtype))
                continue
            h = source.index_select(0, idx)
            gm = g.to(torch.promote_types(source.dtype, weight.dtype))
            if grad_src is not None:
                grad_src.index_copy_(0, idx, (gm @ weight.to(gm.dtype)).to(source.dtype))
            if grad_w is not None:
                grad_w += (gm.T @ h.to(gm.dtype)).to(dtype)
            if grad_b is not None:
                grad_b += g.sum(0)
        return (
            grad_src,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
            None,
        )


def _logits(
    source: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    idx: torch.Tensor,
    spec: ChunkSpec,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's student logits ``z [c, V]`` in ``dtype`` and ``dz/draw`` (None when it is 1)."""
    rows = source.index_select(0, idx)
    if weight is None:
        raw = rows.to(dtype)
    else:
        mm = torch.promote_types(rows.dtype, weight.dtype)
        # The matmul runs in the inputs' precision (bf16 on GPU); the softmax then in float32.
        raw = (rows.to(mm) @ weight.to(mm).T).to(dtype)
        if bias is not None:
            raw = raw + bias.to(dtype)
    deriv: torch.Tensor | None = None
    if spec.softcap is not None:
        th = torch.tanh(raw / spec.softcap)
        raw = spec.softcap * th
        deriv = 1.0 - th.square()
    if spec.temperature != 1.0:
        raw = raw / spec.temperature
        deriv = (deriv if deriv is not None else torch.ones_like(raw)) / spec.temperature
    return raw, deriv


def chunked_token_losses(
    source: torch.Tensor,
    rows: torch.Tensor,
    target: torch.Tensor,
    spec: ChunkSpec,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token losses ``[n]`` (float32, float64 for float64 inputs) of the selected rows, chunked.

    Args:
        source: Hidden states ``[N, D]`` (with ``weight``) or student logits ``[N, V]`` (without).
        rows: ``[n]`` int64 indices into ``source`` of the positions to score.
        target: ``[N]`` target ids (``kind="ce"``) or ``[N, V]`` teacher logits / log-probabilities;
            indexed by ``rows`` chunk by chunk (never copied whole). Treated as a constant.
        spec: What to compute and the chunk size.
        weight: The output head ``[V, D]``.
        bias: Its bias ``[V]``.

    Returns:
        Differentiable per-token losses; backward gives gradients for ``source``, ``weight`` and
        ``bias`` without materialising ``[n, V]``.
    """
    if spec.chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {spec.chunk_size}")
    if spec.softcap is not None and spec.softcap <= 0:
        raise ValueError(f"logit softcap must be > 0, got {spec.softcap}")
    if spec.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {spec.temperature}")
    if spec.kind == "jsd" and not 0.0 < spec.beta < 1.0:
        raise ValueError(f"the mixed JSD needs 0 < beta < 1, got {spec.beta} (use fkl/rkl at the ends)")
    out: torch.Tensor = _ChunkedLoss.apply(source, weight, bias, rows, target.detach(), spec)
    return out
