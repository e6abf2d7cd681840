"""Strong-to-weak distillation steps: off-policy on teacher-written data, on-policy on the student's samples.

Implements the distillation stage of Qwen3-VL (technical report arXiv 2511.21631, section 4;
REFERENCE.md section 4), after Qwen3's strong-to-weak distillation (arXiv 2505.09388, section 4.5)
and GKD (Agarwal et al., arXiv 2306.13649):

- off-policy (:func:`off_policy_distill_loss`): cross-entropy on teacher-written responses, or, with
  the teacher's next-token distributions, the forward KL (or JSD(beta)) to them at every labelled
  position;
- on-policy (:func:`on_policy_distill_step`): the student samples a completion for each prompt; student
  and (frozen) teacher score the sampled tokens; the loss is the per-token reverse KL estimated on the
  sampled tokens (:func:`vl_train.distill_losses.reverse_kl_sampled`) or GKD's JSD(beta) over the full
  distributions at the sampled positions (:func:`vl_train.distill_losses.generalized_jsd`, chunked: the
  student's logits exist one chunk at a time).

The teacher runs under ``torch.no_grad`` and its parameters never receive gradients. Labels follow the
data pipeline's convention (aligned with ``input_ids``, ``-100`` unsupervised); the shift to next-token
targets happens here: the hidden state at position ``t`` predicts token ``t + 1``.

Notation: ``B`` prompts, ``P`` prompt length (left-padded), ``T`` sampled tokens, ``V`` vocabulary,
``p``/``q`` student/teacher distributions, ``y_t`` the sampled token at step ``t``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .distill_losses import forward_kl, generalized_jsd, reverse_kl_sampled
from .logprobs import token_logprobs
from .losses import LossOutput, Reduction, lm_loss

__all__ = [
    "DistillStepOutput",
    "completion_mask",
    "model_inputs",
    "off_policy_distill_loss",
    "on_policy_distill_step",
    "sample_completions",
    "sampled_distill_loss",
]

_PROMPT_KEYS = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
)
_MODEL_KEYS = (*_PROMPT_KEYS, "segment_ids")


@dataclass
class DistillStepOutput:
    """One on-policy step's result.

    Attributes:
        loss: The scalar to back-propagate (gradients reach the student only).
        sequences: ``[B, P + T]`` prompts followed by the sampled completions.
        completion_mask: ``[B, T]`` True on sampled tokens up to and including the first EOS.
        details: The reduction's :class:`vl_train.losses.LossOutput`.
    """

    loss: torch.Tensor
    sequences: torch.Tensor
    completion_mask: torch.Tensor
    details: LossOutput


def model_inputs(batch: Mapping[str, Any], keys: tuple[str, ...] = _MODEL_KEYS) -> dict[str, Any]:
    """The entries of ``batch`` that are model inputs (``keys``) and not ``None``."""
    return {k: batch[k] for k in keys if batch.get(k) is not None}


def _eos_ids(model: nn.Module, eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is None:
        config = getattr(model, "config", None)
        text = getattr(config, "text_config", config)
        eos_token_id = getattr(text, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def completion_mask(completions: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """``[B, T]`` True on tokens up to and including each row's first EOS (all of them without one)."""
    if not eos_ids:
        return torch.ones_like(completions, dtype=torch.bool)
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device))
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return ~after


@torch.no_grad()
def sample_completions(
    student: nn.Module,
    batch: Mapping[str, Any],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    **generate_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student samples one completion per (left-padded) prompt.

    Returns:
        ``sequences [B, P + T]`` and the ``[B, T]`` completion mask (see :func:`completion_mask`).
    """
    if max_new_tokens < 1 or not temperature > 0:
        raise ValueError(f"need max_new_tokens >= 1 and temperature > 0, got {max_new_tokens} and {temperature}")
    eos = _eos_ids(student, eos_token_id)
    was_training = student.training
    student.eval()
    try:
        sequences = student.generate(  # type: ignore[operator]
            **model_inputs(batch, _PROMPT_KEYS),
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos or None,
            pad_token_id=pad_token_id if pad_token_id is not None else (eos[0] if eos else 0),
            **generate_kwargs,
        )
    finally:
        student.train(was_training)
    prompt_len = batch["input_ids"].shape[1]
    return sequences, completion_mask(sequences[:, prompt_len:], eos)


def _extended_inputs(batch: Mapping[str, Any], sequences: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """Model inputs for ``sequences``: the prompt's visual inputs, masks extended over the completion."""
    inputs = model_inputs(batch, _PROMPT_KEYS)
    prompt_mask = batch.get("attention_mask")
    if prompt_mask is None:
        prompt_mask = torch.ones_like(batch["input_ids"])
    inputs["input_ids"] = sequences
    inputs["attention_mask"] = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], 1)
    if "mm_token_type_ids" in inputs:
        types = inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(mask.shape)], 1)
    return inputs


def _completion_hidden(model: nn.Module, inputs: Mapping[str, Any], steps: int) -> torch.Tensor:
    """``[B, T, D]`` final hidden states at the positions that predict the ``T`` completion tokens."""
    hidden = model.forward_hidden(**inputs).last_hidden_state  # type: ignore[operator]
    return hidden[:, -steps - 1 : -1]


def sampled_distill_loss(
    student: nn.Module,
    teacher: nn.Module,
    batch: Mapping[str, Any],
    sequences: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss: Literal["reverse_kl", "jsd"] = "reverse_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: Reduction = "token",
    normalizer: torch.Tensor | float | None = None,
    chunk_size: int = 1024,
) -> LossOutput:
    """The on-policy loss on given sampled ``sequences`` (the part of a step after sampling).

    Args:
        student: The student (trained).
        teacher: The teacher (frozen; run without gradients). Same tokenizer as the student.
        batch: The prompts (``input_ids`` ``[B, P]`` and visual inputs).
        sequences: ``[B, P + T]`` prompts and completions.
        mask: ``[B, T]`` True on scored completion tokens.
        loss: ``"reverse_kl"`` (sampled estimator) or ``"jsd"`` (GKD's JSD(beta), full distributions).
        beta: JSD interpolation in ``[0, 1]``.
        temperature: Divides student and teacher logits.
        reduction: ``"token"``, ``"sample"`` or ``"sqrt"`` over the scored tokens.
        normalizer: A global normaliser (gradient accumulation, data parallelism).
        chunk_size: Positions per chunk of the student's vocabulary projection.

    Raises:
        ValueError: An unknown ``loss`` or shapes that do not fit together.
    """
    if loss not in ("reverse_kl", "jsd"):
        raise ValueError(f"on-policy loss must be 'reverse_kl' or 'jsd', got {loss!r}")
    prompt_len = batch["input_ids"].shape[1]
    steps = sequences.shape[1] - prompt_len
    if steps < 1 or mask.shape != (sequences.shape[0], steps):
        raise ValueError(
            f"sequences {tuple(sequences.shape)} must extend the prompts [B, {prompt_len}] and mask "
            f"{tuple(mask.shape)} must be [B, T] = {(sequences.shape[0], steps)}"
        )
    inputs = _extended_inputs(batch, sequences, mask)
    tokens = sequences[:, prompt_len:]
    with torch.no_grad():
        teacher_hidden = _completion_hidden(teacher, inputs, steps)
        teacher_weight = teacher.output_weight()  # type: ignore[operator]
    student_hidden = _completion_hidden(student, inputs, steps)
    weight = student.output_weight()  # type: ignore[operator]
    if loss == "reverse_kl":
        kw = {"temperature": temperature, "chunk_size": chunk_size}
        with torch.no_grad():
            teacher_lp, _ = token_logprobs(teacher_hidden, teacher_weight, tokens, **kw)  # type: ignore[arg-type]
        student_lp, _ = token_logprobs(student_hidden, weight, tokens, **kw)  # type: ignore[arg-type]
        return reverse_kl_sampled(student_lp, teacher_lp, mask=mask, reduction=reduction, normalizer=normalizer)
    with torch.no_grad():
        teacher_logits = (teacher_hidden @ teacher_weight.T).float()
    return generalized_jsd(
        student_hidden,
        teacher_logits,
        beta,
        lm_head_weight=weight,
        mask=mask,
        reduction=reduction,
        normalizer=normalizer,
        temperature=temperature,
        chunk_size=chunk_size,
    )


def on_policy_distill_step(
    student: nn.Module,
    teacher: nn.Module,
    batch: Mapping[str, Any],
    *,
    loss: Literal["reverse_kl", "jsd"] = "reverse_kl",
    beta: float = 0.5,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    reduction: Reduction = "token",
    normalizer: torch.Tensor | float | None = None,
    chunk_size: int = 1024,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> DistillStepOutput:
    """One on-policy distillation step: the student samples, both models score, the loss is returned.

    The caller back-propagates ``out.loss`` and steps the student's optimiser (so gradient
    accumulation and the global normaliser work as in the trainer).

    Args:
        student: The student, a :class:`vl_model.TrainableVLM` that can ``generate``.
        teacher: The teacher, same vocabulary; frozen.
        batch: Left-padded prompts: ``input_ids`` ``[B, P]``, ``attention_mask`` and visual inputs.
        loss: ``"reverse_kl"`` or ``"jsd"``.
        beta: JSD interpolation.
        max_new_tokens: Tokens sampled per prompt.
        temperature: Sampling and scoring temperature.
        reduction: Reduction over the sampled tokens.
        normalizer: A global normaliser.
        chunk_size: Positions per chunk.
        eos_token_id: Stops sampling (default: the student's config).
        pad_token_id: Fills finished rows (default: the first EOS).
    """
    sequences, mask = sample_completions(
        student,
        batch,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    details = sampled_distill_loss(
        student,
        teacher,
        batch,
        sequences,
        mask,
        loss=loss,
        beta=beta,
        temperature=temperature,
        reduction=reduction,
        normalizer=normalizer,
        chunk_size=chunk_size,
    )
    return DistillStepOutput(loss=details.loss, sequences=sequences, completion_mask=mask, details=details)


def off_policy_distill_loss(
    student: nn.Module,
    batch: Mapping[str, Any],
    teacher_logprobs: torch.Tensor | None = None,
    *,
    loss: Literal["forward_kl", "jsd"] = "forward_kl",
    beta: float = 0.5,
    ce_weight: float = 0.0,
    temperature: float = 1.0,
    reduction: Reduction = "sqrt",
    normalizer: torch.Tensor | float | None = None,
    chunk_size: int = 4096,
) -> LossOutput:
    """Off-policy distillation on teacher-written data.

    Without ``teacher_logprobs`` this is the SFT cross-entropy on the teacher's responses. With them,
    the loss is the forward KL (or JSD(beta)) to the teacher at every labelled target, plus
    ``ce_weight`` times the cross-entropy.

    Args:
        student: The student model.
        batch: A training batch (``input_ids``, ``labels`` aligned with ``input_ids``, optional
            ``segment_ids``, ``attention_mask`` and visual inputs), e.g. from ``iter_packed``.
        teacher_logprobs: The teacher's next-token log-probabilities (or logits) either at every
            position ``[B, L, V]`` (as ``teacher(**batch).logits``) or at the labelled targets only
            ``[N, V]`` (row-major order of ``labels[:, 1:] != -100``).
        loss: ``"forward_kl"`` or ``"jsd"`` (with ``teacher_logprobs``).
        beta: JSD interpolation.
        ce_weight: Weight of the cross-entropy added to the divergence.
        temperature: Divides student and teacher logits in the divergence.
        reduction: ``"sqrt"`` (default), ``"token"`` or ``"sample"``.
        normalizer: A global normaliser.
        chunk_size: Positions per chunk.

    Raises:
        ValueError: An unknown ``loss`` or teacher shapes that fit neither layout.
    """
    if loss not in ("forward_kl", "jsd"):
        raise ValueError(f"off-policy divergence must be 'forward_kl' or 'jsd', got {loss!r}")
    hidden = student.forward_hidden(**model_inputs(batch)).last_hidden_state[:, :-1]  # type: ignore[operator]
    targets = batch["labels"][:, 1:]
    segments = batch["segment_ids"][:, 1:] if batch.get("segment_ids") is not None else None
    weight = student.output_weight()  # type: ignore[operator]
    ce = lm_loss(
        hidden, weight, targets, segment_ids=segments, reduction=reduction, chunk_size=chunk_size, normalizer=normalizer
    )
    if teacher_logprobs is None:
        return ce
    keep = targets != -100
    vocab = weight.shape[0]
    if teacher_logprobs.dim() == 3 and teacher_logprobs.shape[:2] == batch["input_ids"].shape:
        teacher = teacher_logprobs[:, :-1][keep]
    elif teacher_logprobs.dim() == 2 and teacher_logprobs.shape[0] == int(keep.sum()):
        teacher = teacher_logprobs
    else:
        raise ValueError(
            f"teacher_logprobs {tuple(teacher_logprobs.shape)} must be [B, L, V] = "
            f"{(*batch['input_ids'].shape, vocab)} or [N, V] with N = {int(keep.sum())} labelled targets"
        )
    # one id per (row, packed sample), unique across rows, since the positions are flattened
    row = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep) * (keep.shape[1] + 1)
    seg = (row + (segments + 1 if segments is not None else 0))[keep]
    kw: dict[str, Any] = {"lm_head_weight": weight, "segment_ids": seg, "reduction": reduction}
    kw.update(normalizer=normalizer, temperature=temperature, chunk_size=chunk_size)
    div = (
        forward_kl(hidden[keep], teacher, **kw)
        if loss == "forward_kl"
        else generalized_jsd(hidden[keep], teacher, beta, **kw)
    )
    if ce_weight:
        div = dataclasses.replace(div, loss=div.loss + ce_weight * ce.loss)
    return div
