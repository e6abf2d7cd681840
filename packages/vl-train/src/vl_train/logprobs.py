"""Log-probabilities of given tokens under a model: the one place that projects hidden states to them.

Used by on-policy distillation (student and teacher scores of the sampled tokens), by RL (the policy,
the rollout policy and the reference model on the rollouts) and by evaluation. For hidden states
``h [N, H]``, the output projection ``W [V, H]``, tokens ``y [N]`` and a temperature ``tau``:

    ``logp_i = log softmax(h_i W^T / tau)[y_i]``,  ``entropy_i = -sum_v p_iv log p_iv``.

The ``[N, V]`` logits exist ``chunk_size`` rows at a time; with gradients each chunk is recomputed
in the backward pass (activation checkpointing) instead of being kept, so memory stays at one chunk.

Notation: ``N`` positions, ``H`` hidden size, ``V`` vocabulary, ``R`` rows, ``P`` prompt length
(left-padded), ``T`` completion length.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["MODEL_KEYS", "completion_logprobs", "token_logprobs"]

MODEL_KEYS = (
    "attention_mask",
    "position_ids",
    "segment_ids",
    "mm_token_type_ids",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
)
"""Inputs of ``forward_hidden`` besides ``input_ids``."""


def _picked(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = (hidden @ weight.T).float() / temperature
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - logits.logsumexp(-1)


def _entropy(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = torch.log_softmax((hidden @ weight.T).float() / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 2048,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logp, entropy or None)`` of ``tokens [...]`` at hidden states ``[..., H]`` (see the module docstring).

    Gradients reach ``hidden`` and ``weight`` through ``logp`` unless called under ``torch.no_grad``;
    the entropy is computed without gradients (a metric).

    Raises:
        ValueError: ``chunk_size < 1``, ``temperature <= 0`` or shapes that do not fit.
    """
    if chunk_size < 1 or not temperature > 0:
        raise ValueError(f"need chunk_size >= 1 and temperature > 0, got {chunk_size} and {temperature}")
    if hidden.shape[:-1] != tokens.shape or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and tokens {tuple(tokens.shape)} "
            "must be [..., H], [V, H] and [...]"
        )
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    picked, entropy = [], []
    for start in range(0, flat_h.shape[0], chunk_size):
        h, t = flat_h[start : start + chunk_size], flat_t[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            part = checkpoint(_picked, h, weight, t, temperature, use_reentrant=False)
        else:
            part = _picked(h, weight, t, temperature)
        picked.append(part)
        if with_entropy:
            with torch.no_grad():
                entropy.append(_entropy(h.detach(), weight.detach(), temperature))
    empty = hidden.new_zeros(tokens.shape, dtype=torch.float32)
    logp = torch.cat(picked).reshape(tokens.shape) if picked else empty
    if not with_entropy:
        return logp, None
    return logp, (torch.cat(entropy).reshape(tokens.shape) if entropy else empty)


def completion_logprobs(
    model: Any,
    sequences: torch.Tensor,
    inputs: Mapping[str, Any],
    prompt_length: int,
    *,
    temperature: float = 1.0,
    chunk_size: int = 2048,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[R, T]`` log-probabilities (and entropies) of the completion tokens ``sequences[:, P:]`` under ``model``.

    Args:
        model: A :class:`vl_model.TrainableVLM` (core or composed model).
        sequences: ``[R, P + T]`` left-padded prompts followed by the completions.
        inputs: The other model inputs over ``sequences`` (``attention_mask [R, P + T]``, pixels, grids...);
            keys outside :data:`MODEL_KEYS` are ignored.
        prompt_length: ``P``.
        temperature: Divides the logits (the sampling temperature, so an unchanged model has ratio 1).
        chunk_size: Positions per chunk of the vocabulary projection.
        with_entropy: Also return the entropies.
    """
    given = {k: v for k, v in inputs.items() if k in MODEL_KEYS and v is not None}
    hidden = model.forward_hidden(input_ids=sequences, **given).last_hidden_state
    positions = hidden[:, prompt_length - 1 : -1]
    return token_logprobs(
        positions,
        model.output_weight(),
        sequences[:, prompt_length:],
        temperature=temperature,
        chunk_size=chunk_size,
        with_entropy=with_entropy,
    )
