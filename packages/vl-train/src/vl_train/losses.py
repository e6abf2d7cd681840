"""Language-model loss on labelled positions: chunked, with token / sample / square-root reductions.

Implements the supervised loss of Qwen3-VL training (REFERENCE.md section 4): cross-entropy only where
labels are set, computed chunk by chunk so the ``[tokens, V]`` logits never exist (see
:mod:`vl_train._chunked_ce`), reduced in one of three ways over the samples of the *global* batch:

- ``token``:  ``L = sum_{j,t} l_{j,t} / sum_j n_j``  (long samples dominate);
- ``sample``: ``L = sum_j (1/n_j) sum_t l_{j,t} / S`` (the mean of per-sample means; short ones dominate);
- ``sqrt``:   ``L = sum_j n_j^{-1/2} sum_t l_{j,t} / sum_j n_j^{1/2}`` (InternVL2.5-style square averaging:
  each sample's share grows as ``sqrt(n_j)``).

Each is ``sum_t w_t l_t / Z`` with a per-token weight ``w_t`` that depends only on the token's own sample
(``1``, ``1/n_j`` or ``n_j^{-1/2}``) and a normaliser ``Z`` that is a plain sum over samples (tokens,
samples, or ``sum_j sqrt(n_j)``). So with ``Z`` summed over every micro-batch and rank first
(:func:`loss_normalizer` + :func:`global_loss_normalizer`), the sum over micro-batches and ranks of
``lm_loss(..., normalizer=Z)`` is exactly the one-big-batch loss, and so is its gradient.

A sample is identified by its row and, on packed rows, its segment id. A sample cut by a micro-batch
(or row) boundary is the caller's business: its two parts count as two samples with their own ``n_j``
(the ``token`` reduction is unaffected). Pack whole samples to keep ``sample``/``sqrt`` exact.

Notation: ``B`` rows, ``L`` positions per row, ``N`` positions, ``D`` hidden size, ``V`` vocabulary,
``n_j`` labelled tokens of sample ``j``, ``S`` samples with ``n_j > 0``, ``Z`` the normaliser.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from vl_moe import MoEBalanceTracker, load_balancing_loss, route

from ._chunked_ce import ChunkSpec, chunked_token_losses

__all__ = [
    "LossOutput",
    "Reduction",
    "SampleLayout",
    "check_finite_loss",
    "global_loss_normalizer",
    "lm_loss",
    "loss_normalizer",
    "moe_aux_loss",
    "reduce_token_losses",
    "sample_layout",
    "track_moe_routing",
]

Reduction = Literal["sqrt", "token", "sample"]
IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """A reduced loss and the statistics a trainer logs.

    Attributes:
        loss: The scalar loss (float32, float64 for float64 inputs), differentiable.
        num_tokens: Local number of scored tokens ``sum_j n_j`` (float32 scalar).
        num_samples: Local number of samples with at least one scored token (float32 scalar).
        normalizer: The ``Z`` the weighted sum was divided by (local unless one was passed).
        per_token: ``[n]`` detached per-token losses in flattened-position order.
        per_sample: ``[S]`` detached mean loss of each sample, samples sorted by (row, segment id).
        sample_tokens: ``[S]`` ``n_j`` of each sample.
    """

    loss: torch.Tensor
    num_tokens: torch.Tensor
    num_samples: torch.Tensor
    normalizer: torch.Tensor
    per_token: torch.Tensor
    per_sample: torch.Tensor
    sample_tokens: torch.Tensor


@dataclass(frozen=True)
class SampleLayout:
    """Which flattened positions are scored and the sample each belongs to."""

    rows: torch.Tensor  # [n] int64 flat positions
    sample: torch.Tensor  # [n] int64 in [0, S)
    counts: torch.Tensor  # [S] float32 n_j


def _check_reduction(reduction: str) -> None:
    if reduction not in get_args(Reduction):
        raise ValueError(f"reduction must be one of {get_args(Reduction)}, got {reduction!r}")


def sample_layout(
    selected: torch.Tensor, segment_ids: torch.Tensor | None = None, *, ignore_index: int = IGNORE_INDEX
) -> SampleLayout:
    """Scored positions and sample ids from labels (``ignore_index`` = unscored) or a bool mask.

    Args:
        selected: ``[B, L]`` or ``[N]`` labels, or a bool mask of the same shape (True = scored).
        segment_ids: Same shape; the packed sample id of each position. Without it each row (the last
            dimension) is one sample.
        ignore_index: The label value of unscored positions.
    """
    if segment_ids is not None and segment_ids.shape != selected.shape:
        raise ValueError(
            f"segment_ids shape {tuple(segment_ids.shape)} must equal the labels/mask shape {tuple(selected.shape)}"
        )
    keep = selected.reshape(-1)
    keep = keep.bool() if keep.dtype == torch.bool else keep != ignore_index
    rows = keep.nonzero().squeeze(-1)
    row_len = max(selected.shape[-1], 1) if selected.dim() > 0 else 1
    key = torch.div(rows, row_len, rounding_mode="floor")[:, None]
    if segment_ids is not None:
        key = torch.cat([key, segment_ids.reshape(-1)[rows, None].to(torch.int64)], dim=1)
    _, sample = torch.unique(key, dim=0, return_inverse=True)
    counts = torch.bincount(sample, minlength=0).to(torch.float32)
    return SampleLayout(rows=rows, sample=sample, counts=counts)


def _normalizer_from_counts(counts: torch.Tensor, reduction: str) -> torch.Tensor:
    # float64: token counts of a global batch may pass 2^24, where float32 stops counting exactly.
    counts = counts.to(torch.float64)
    if reduction == "token":
        return counts.sum()
    if reduction == "sample":
        return torch.tensor(float(counts.numel()), dtype=torch.float64, device=counts.device)
    return counts.sqrt().sum()


def loss_normalizer(
    labels: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    reduction: Reduction = "sqrt",
    *,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """One micro-batch's share of ``Z``: its token count, sample count, or ``sum_j sqrt(n_j)`` (float64).

    Args:
        labels: ``[B, L]`` or ``[N]`` labels (``ignore_index`` = unscored), or a bool mask.
        segment_ids: Packed sample ids, same shape (without: one sample per row).
        reduction: ``"token"``, ``"sample"`` or ``"sqrt"``.
        ignore_index: The label value of unscored positions.
    """
    _check_reduction(reduction)
    return _normalizer_from_counts(sample_layout(labels, segment_ids, ignore_index=ignore_index).counts, reduction)


def global_loss_normalizer(
    local: torch.Tensor | Sequence[torch.Tensor | float],
    *,
    process_group: object | None = None,
    all_reduce: Callable[[torch.Tensor], object] | None = None,
) -> torch.Tensor:
    """Sum per-micro-batch normalisers, then over data-parallel ranks: the global ``Z``.

    Compute :func:`loss_normalizer` for every micro-batch of the step before the first backward, pass
    them here, and give the result to every ``lm_loss(..., normalizer=Z)`` of the step. Summing those
    losses over micro-batches reproduces the big batch; over ranks, the gradients must be *summed*:
    DDP/FSDP average them, so multiply each rank's loss by the world size there.

    Args:
        local: One scalar or a sequence of per-micro-batch scalars of this rank.
        process_group: Group for ``torch.distributed.all_reduce`` (used when it is initialised).
        all_reduce: Optional hook summing a tensor in place across ranks (custom communication).

    Returns:
        A float64 scalar, equal on every rank.
    """
    if isinstance(local, torch.Tensor):
        total = local.detach().to(torch.float64).sum().clone()
    else:
        if len(local) == 0:
            raise ValueError("global_loss_normalizer got no micro-batch normalisers")
        total = torch.stack([torch.as_tensor(x, dtype=torch.float64).detach().reshape(()) for x in local]).sum()
    if all_reduce is not None:
        all_reduce(total)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, group=process_group)
    return total


def reduce_token_losses(
    per_token: torch.Tensor,
    layout: SampleLayout,
    reduction: Reduction = "sqrt",
    normalizer: torch.Tensor | float | None = None,
) -> LossOutput:
    """Weight per-token losses by their sample (``1``, ``1/n_j``, ``n_j^-1/2``) and divide by ``Z``.

    Args:
        per_token: ``[n]`` differentiable per-token losses, aligned with ``layout.rows``.
        layout: From :func:`sample_layout`.
        reduction: ``"token"``, ``"sample"`` or ``"sqrt"``.
        normalizer: The global ``Z`` (default: this micro-batch's own).
    """
    _check_reduction(reduction)
    counts = layout.counts.to(per_token.device)
    if reduction == "token":
        weight = torch.ones_like(per_token)
    else:
        n = counts.to(per_token.dtype)
        weight = (n.reciprocal() if reduction == "sample" else n.rsqrt())[layout.sample]
    z = _normalizer_from_counts(counts, reduction) if normalizer is None else torch.as_tensor(normalizer)
    z = z.to(device=per_token.device, dtype=torch.float64).detach()
    # Z = 0 only when nothing is scored anywhere: the numerator is then 0 too, and so is the loss.
    safe_z = torch.where(z > 0, z, torch.ones_like(z))
    loss = (per_token * weight).sum() / safe_z.to(per_token.dtype)
    detached = per_token.detach()
    sums = torch.zeros(counts.shape, dtype=detached.dtype, device=detached.device).index_add_(
        0, layout.sample, detached
    )
    return LossOutput(
        loss=loss,
        num_tokens=counts.sum(),  # float32: exact per micro-batch
        num_samples=torch.tensor(float(counts.numel()), device=counts.device),
        normalizer=z,
        per_token=detached,
        per_sample=sums / counts.clamp_min(1.0).to(sums.dtype),
        sample_tokens=counts,
    )


def lm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    reduction: Reduction = "sqrt",
    chunk_size: int = 4096,
    normalizer: torch.Tensor | float | None = None,
    lm_head_bias: torch.Tensor | None = None,
    logit_softcap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    layout: SampleLayout | None = None,
) -> LossOutput:
    """Cross-entropy of ``hidden @ lm_head_weight.T`` on labelled positions, chunked, reduced.

    Args:
        hidden: ``[N, D]`` or ``[B, L, D]`` final hidden states (after the final norm).
        lm_head_weight: ``[V, D]``.
        labels: ``[N]`` or ``[B, L]`` target ids ALREADY aligned with positions (no shift inside);
            ``ignore_index`` marks unscored positions.
        segment_ids: ``[N]`` or ``[B, L]`` packed sample ids (needed by ``sample``/``sqrt`` on packed
            rows); without it each row is one sample.
        reduction: ``"sqrt"`` (default, Qwen3-VL), ``"token"`` or ``"sample"``.
        chunk_size: Labelled tokens per chunk; peak extra memory is about ``4 x chunk_size x V`` floats.
        normalizer: The global ``Z`` from :func:`global_loss_normalizer` (default: this call's own).
        lm_head_bias: Optional ``[V]``.
        logit_softcap: Optional ``c``: logits become ``c tanh(logits / c)``.
        ignore_index: Label value of unscored positions.
        layout: The scored positions and their samples, given instead of being read from ``labels`` and
            ``segment_ids``: a context-parallel part's positions with the token counts of the whole samples
            (:meth:`vl_train.context_parallel.ContextParallel.layout`).

    Returns:
        A :class:`LossOutput`; samples without labelled tokens contribute nothing (no NaN), and a
        batch without any gives a zero loss that still back-propagates (zeros).

    Raises:
        ValueError: Mismatched shapes, labels outside ``[0, V)``, bad reduction or chunk size.

    Example:
        >>> h, w = torch.randn(2, 5, 8), torch.randn(11, 8)
        >>> y = torch.tensor([[-100, 3, 4, -100, -100], [1, 2, 3, 4, 5]])
        >>> out = lm_loss(h, w, y, reduction="token")
        >>> ref = torch.nn.functional.cross_entropy((h @ w.T).reshape(-1, 11), y.reshape(-1))
        >>> torch.allclose(out.loss, ref)
        True
    """
    if hidden.dim() < 2 or lm_head_weight.dim() != 2 or hidden.shape[-1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"hidden [..., D] {tuple(hidden.shape)} and lm_head_weight [V, D] {tuple(lm_head_weight.shape)} "
            "must share D"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    vocab = lm_head_weight.shape[0]
    if lm_head_bias is not None and lm_head_bias.shape != (vocab,):
        raise ValueError(f"lm_head_bias must be [V] = ({vocab},), got {tuple(lm_head_bias.shape)}")
    if layout is None:
        layout = sample_layout(labels, segment_ids, ignore_index=ignore_index)
    elif layout.rows.numel() and int(layout.rows.max()) >= labels.numel():
        raise ValueError(f"layout names position {int(layout.rows.max())} but labels hold {labels.numel()} positions")
    flat_labels = labels.reshape(-1).to(torch.int64)
    picked = flat_labels[layout.rows]
    bad = (picked < 0) | (picked >= vocab)
    if bool(bad.any()):
        raise ValueError(
            f"labels must be in [0, V={vocab}) or {ignore_index}; got e.g. {int(picked[bad][0])} "
            f"({int(bad.sum())} bad positions)"
        )
    spec = ChunkSpec(kind="ce", chunk_size=chunk_size, softcap=logit_softcap)
    per_token = chunked_token_losses(
        hidden.reshape(-1, hidden.shape[-1]), layout.rows, flat_labels, spec, weight=lm_head_weight, bias=lm_head_bias
    )
    return reduce_token_losses(per_token, layout, reduction, normalizer)


def check_finite_loss(loss: torch.Tensor) -> bool:
    """True when every element of ``loss`` is finite; one host synchronisation at most."""
    return bool(torch.isfinite(loss.detach()).all())


def track_moe_routing(
    tracker: MoEBalanceTracker,
    router_logits: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> None:
    """Add one micro-batch's routing (``top_k`` of each layer's logits) to a global-batch tracker."""
    if len(router_logits) != tracker.num_layers:
        raise ValueError(f"got router logits of {len(router_logits)} layers, the tracker has {tracker.num_layers}")
    for layer, logits in enumerate(router_logits):
        flat = logits.detach().reshape(-1, logits.shape[-1])
        tracker.add(route(flat, tracker.top_k)[1], attention_mask, layer=layer)


def moe_aux_loss(
    router_logits: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None,
    top_k: int,
    tracker: MoEBalanceTracker | None = None,
    coef: float = 1e-3,
) -> torch.Tensor:
    """``coef`` x the Switch load-balancing loss, averaged over MoE layers.

    Without ``tracker`` the expert frequencies ``f`` are this micro-batch's own (transformers'
    behaviour). With a :class:`vl_moe.MoEBalanceTracker` (fed by :func:`track_moe_routing` for every
    micro-batch of the step, ideally before the first loss) ``f`` is global (Qiu et al., arXiv
    2501.11873) and the value returned is this micro-batch's share, scaled by its tokens over the global
    tokens: summed over micro-batches and ranks it equals the one-big-batch loss, like :func:`lm_loss`
    with a global normaliser.

    Args:
        router_logits: One ``[T, E]`` (or ``[B, L, E]``) tensor per MoE layer.
        attention_mask: ``T`` entries, 0 for padding (counts in neither f nor P), or None.
        top_k: Experts per token.
        tracker: Global-batch counts.
        coef: The auxiliary-loss coefficient.
    """
    layers = list(router_logits)
    if tracker is None:
        return coef * load_balancing_loss(layers, top_k, attention_mask=attention_mask)
    if len(layers) != tracker.num_layers or top_k != tracker.top_k:
        raise ValueError(
            f"got {len(layers)} layers with top_k={top_k}; the tracker has {tracker.num_layers} layers, top_k={tracker.top_k}"
        )
    losses = []
    for layer, logits in enumerate(layers):
        local = float(logits.numel() // logits.shape[-1]) if attention_mask is None else attention_mask.sum()
        global_tokens = tracker.global_counts(layer)[1].to(logits.device).clamp_min(1.0)
        share = torch.as_tensor(local, dtype=torch.float32, device=logits.device) / global_tokens
        losses.append(share * tracker.loss(logits, attention_mask, layer=layer))
    return coef * torch.stack(losses).mean()
