"""Per-token distillation losses (strong-to-weak distillation, REFERENCE.md section 4).

Off-policy the student learns the teacher's full next-token distribution (forward KL); on-policy the
student samples and minimises the reverse KL to the teacher, either estimated on the sampled token or
exact over the vocabulary; GKD's generalised Jensen-Shannon divergence (Agarwal et al., "On-Policy
Distillation of Language Models", arXiv 2306.13649, eq. 1) interpolates between the two.

Conventions (identical to the GKD paper and TRL's ``GKDTrainer.generalized_jsd_loss``): with teacher
``q`` and student ``p`` at one position,

- forward KL ``KL(q || p) = sum_v q (log q - log p)`` (mode covering);
- reverse KL ``KL(p || q) = sum_v p (log p - log q)`` (mode seeking);
- ``JSD_beta = beta KL(q || m) + (1 - beta) KL(p || m)`` with ``m = beta q + (1 - beta) p``; like TRL,
  ``beta = 0`` *is* the forward KL and ``beta = 1`` the reverse KL (the limits of ``JSD_beta / beta``
  and ``JSD_beta / (1 - beta)``: the unscaled mixture vanishes at both ends).

Whenever full distributions are involved the work is chunked over positions (:mod:`vl_train._chunked_ce`):
the student comes as logits ``[..., V]`` or as hidden states ``[..., D]`` with ``lm_head_weight``, in
which case its logits only ever exist one chunk at a time. Teacher inputs are logits or log-probabilities
(both are normalised with ``log_softmax`` per chunk, which leaves log-probabilities unchanged) and are
treated as constants. ``temperature`` divides student and teacher logits alike (no ``T^2`` factor).
Positions are selected by ``mask`` and reduced like :func:`vl_train.losses.lm_loss` (``token``,
``sample`` or ``sqrt``, with an optional global normaliser).

Notation: ``N`` positions, ``D`` hidden size, ``V`` vocabulary, ``p``/``q`` student/teacher
distributions, ``s``/``t`` their log-probabilities, ``sg`` stop-gradient.
"""

from __future__ import annotations

import torch

from ._chunked_ce import ChunkSpec, Kind, chunked_token_losses
from .losses import LossOutput, Reduction, reduce_token_losses, sample_layout

__all__ = ["exact_reverse_kl", "forward_kl", "generalized_jsd", "reverse_kl_sampled"]


def _mask_or_all(mask: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if mask.shape != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the positions' shape {tuple(shape)}")
    return mask.bool()


def _divergence(
    kind: Kind,
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    beta: float,
    lm_head_weight: torch.Tensor | None,
    lm_head_bias: torch.Tensor | None,
    mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    reduction: Reduction,
    normalizer: torch.Tensor | float | None,
    temperature: float,
    chunk_size: int,
) -> LossOutput:
    if lm_head_weight is not None:
        if lm_head_weight.dim() != 2 or student.shape[-1] != lm_head_weight.shape[1]:
            raise ValueError(
                f"student hidden [..., D] {tuple(student.shape)} and lm_head_weight [V, D] "
                f"{tuple(lm_head_weight.shape)} must share D"
            )
        vocab = lm_head_weight.shape[0]
    else:
        if lm_head_bias is not None:
            raise ValueError("lm_head_bias needs lm_head_weight (the student is hidden states then)")
        vocab = student.shape[-1]
    if teacher.shape[:-1] != student.shape[:-1] or teacher.shape[-1] != vocab:
        raise ValueError(
            f"teacher {tuple(teacher.shape)} must be [..., V] = {(*student.shape[:-1], vocab)} to match the student "
            f"{tuple(student.shape)}"
        )
    keep = _mask_or_all(mask, student.shape[:-1], student.device)
    layout = sample_layout(keep, segment_ids)
    spec = ChunkSpec(kind=kind, chunk_size=chunk_size, temperature=temperature, beta=beta)
    per_token = chunked_token_losses(
        student.reshape(-1, student.shape[-1]),
        layout.rows,
        teacher.reshape(-1, vocab),
        spec,
        weight=lm_head_weight,
        bias=lm_head_bias,
    )
    return reduce_token_losses(per_token, layout, reduction, normalizer)


def forward_kl(
    student: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    reduction: Reduction = "token",
    normalizer: torch.Tensor | float | None = None,
    temperature: float = 1.0,
    chunk_size: int = 4096,
) -> LossOutput:
    """Per-token ``KL(q || p)`` to the teacher's distribution (off-policy distillation), reduced.

    Args:
        student: Student logits ``[..., V]``, or hidden states ``[..., D]`` with ``lm_head_weight``.
        teacher_logprobs: ``[..., V]`` teacher log-probabilities (or logits) at the same positions.
        lm_head_weight: The student's head ``[V, D]`` when ``student`` holds hidden states.
        lm_head_bias: Its optional bias ``[V]``.
        mask: Bool ``[...]``, True at scored positions (default: all).
        segment_ids: Packed sample ids ``[...]`` for the ``sample``/``sqrt`` reductions.
        reduction: ``"token"`` (default), ``"sample"`` or ``"sqrt"``.
        normalizer: A global normaliser (see :func:`vl_train.losses.global_loss_normalizer`).
        temperature: Divides student and teacher logits.
        chunk_size: Positions per chunk.

    Returns:
        A :class:`vl_train.losses.LossOutput`.
    """
    return _divergence(
        "fkl",
        student,
        teacher_logprobs,
        beta=0.0,
        lm_head_weight=lm_head_weight,
        lm_head_bias=lm_head_bias,
        mask=mask,
        segment_ids=segment_ids,
        reduction=reduction,
        normalizer=normalizer,
        temperature=temperature,
        chunk_size=chunk_size,
    )


def exact_reverse_kl(
    student: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    reduction: Reduction = "token",
    normalizer: torch.Tensor | float | None = None,
    temperature: float = 1.0,
    chunk_size: int = 4096,
) -> LossOutput:
    """Per-token ``KL(p || q)`` summed over the whole vocabulary (on-policy distillation), reduced.

    Args are those of :func:`forward_kl`. A teacher log-probability of ``-inf`` where the student
    puts mass gives an infinite loss, as the divergence is.
    """
    return _divergence(
        "rkl",
        student,
        teacher_logprobs,
        beta=1.0,
        lm_head_weight=lm_head_weight,
        lm_head_bias=lm_head_bias,
        mask=mask,
        segment_ids=segment_ids,
        reduction=reduction,
        normalizer=normalizer,
        temperature=temperature,
        chunk_size=chunk_size,
    )


def generalized_jsd(
    student: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    *,
    lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    reduction: Reduction = "token",
    normalizer: torch.Tensor | float | None = None,
    temperature: float = 1.0,
    chunk_size: int = 4096,
) -> LossOutput:
    """GKD's ``JSD_beta = beta KL(q || m) + (1 - beta) KL(p || m)``, ``m = beta q + (1 - beta) p``.

    ``beta = 0`` gives exactly :func:`forward_kl` and ``beta = 1`` :func:`exact_reverse_kl` (TRL's
    convention); ``beta = 0.5`` is the symmetric Jensen-Shannon divergence.

    Args:
        student: Student logits ``[..., V]``, or hidden states ``[..., D]`` with ``lm_head_weight``.
        teacher_logits: ``[..., V]`` teacher logits (or log-probabilities).
        beta: In ``[0, 1]``.
        lm_head_weight: The student's head ``[V, D]`` when ``student`` holds hidden states.
        lm_head_bias: Its optional bias ``[V]``.
        mask: Bool ``[...]``, True at scored positions (default: all).
        segment_ids: Packed sample ids for the ``sample``/``sqrt`` reductions.
        reduction: ``"token"`` (default), ``"sample"`` or ``"sqrt"``.
        normalizer: A global normaliser.
        temperature: Divides student and teacher logits.
        chunk_size: Positions per chunk.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    kind: Kind = "fkl" if beta == 0.0 else "rkl" if beta == 1.0 else "jsd"
    return _divergence(
        kind,
        student,
        teacher_logits,
        beta=beta,
        lm_head_weight=lm_head_weight,
        lm_head_bias=lm_head_bias,
        mask=mask,
        segment_ids=segment_ids,
        reduction=reduction,
        normalizer=normalizer,
        temperature=temperature,
        chunk_size=chunk_size,
    )


def reverse_kl_sampled(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    reduction: Reduction = "token",
    normalizer: torch.Tensor | float | None = None,
) -> LossOutput:
    """On-policy reverse KL estimated on the student's own sampled tokens ``y_t ~ p``.

    The value per token is the estimator ``k_t = log p(y_t) - log q(y_t)`` (unbiased for
    ``KL(p || q)``). Its plain derivative, ``grad log p(y_t)``, has zero mean under sampling, so the
    gradient used is the score-function one, ``sg(k_t) grad log p(y_t)`` (per-token reward
    ``-k_t`` with discount 0): per token ``l_t = sg(k_t) + sg(k_t) (log p - sg(log p))``, whose value is
    ``k_t`` and whose expected gradient is that of the exact reverse KL.

    Args:
        student_logprobs: ``[...]`` ``log p(y_t)`` of the sampled tokens, differentiable.
        teacher_logprobs: ``[...]`` ``log q(y_t)`` of the same tokens (a constant).
        mask: Bool ``[...]``, True at scored (generated) positions (default: all).
        segment_ids: Packed sample ids for the ``sample``/``sqrt`` reductions.
        reduction: ``"token"`` (default), ``"sample"`` or ``"sqrt"``.
        normalizer: A global normaliser.
    """
    if teacher_logprobs.shape != student_logprobs.shape:
        raise ValueError(
            f"teacher_logprobs {tuple(teacher_logprobs.shape)} must match student_logprobs "
            f"{tuple(student_logprobs.shape)}"
        )
    keep = _mask_or_all(mask, student_logprobs.shape, student_logprobs.device)
    layout = sample_layout(keep, segment_ids)
    dtype = torch.float64 if student_logprobs.dtype == torch.float64 else torch.float32
    s = student_logprobs.reshape(-1)[layout.rows].to(dtype)
    k = (s - teacher_logprobs.reshape(-1)[layout.rows].to(dtype)).detach()
    per_token = k + k * (s - s.detach())
    return reduce_token_losses(per_token, layout, reduction, normalizer)
