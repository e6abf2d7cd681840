"""Held-out accuracy per task: greedy, non-thinking answers scored by the synthetic verifier.

Images go through ``examples/demo/demo_eval.evaluate_samples`` (batched, left-padded ``generate``).
The language models alone are scored on the text view of the same samples (:func:`evaluate_text`),
the ceiling an adapter can reach with them: what each LLM answers when every cell is named exactly.

Notation: ``B`` prompts per batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from at_cells import text_prompt_inputs
from at_models import ModelSpec
from demo_eval import evaluate_samples

from vl_train.data import SyntheticDataset, verify

__all__ = ["TASKS", "evaluate_images", "evaluate_text", "heldout_samples", "per_task"]

TASKS: tuple[str, ...] = ("count", "colour", "compare")
"""The example's tasks: the single- and two-image tasks whose answer needs no cell's position."""


def heldout_samples(tasks: Sequence[str], per_task: int, seed: int, spec: ModelSpec) -> list[dict[str, Any]]:
    """``per_task`` held-out samples of every task (a split disjoint from training), non-thinking."""
    out: list[dict[str, Any]] = []
    for task in tasks:
        out.extend(
            SyntheticDataset(
                "heldout",
                size=per_task,
                seed=seed,
                tasks=[task],
                image_size_range=spec.image_size_range,
                thinking=0.0,
                grid=spec.grid,
            )
        )
    return out


def per_task(samples: Sequence[dict[str, Any]], scores: Sequence[float]) -> dict[str, float]:
    """Mean score per task."""
    totals: dict[str, list[float]] = defaultdict(list)
    for sample, score in zip(samples, scores, strict=True):
        totals[str(sample["task"])].append(float(score))
    return {task: math.fsum(v) / len(v) for task, v in sorted(totals.items())}


def evaluate_images(
    model: Any, processor: Any, samples: Sequence[dict[str, Any]], *, max_new_tokens: int, progress: bool, desc: str
) -> dict[str, float]:
    """Held-out accuracy per task of a composed model on the images."""
    result = evaluate_samples(model, processor, samples, max_new_tokens=max_new_tokens, progress=progress, desc=desc)
    return result.per_task


@torch.no_grad()
def evaluate_text(
    model: Any,
    processor: Any,
    samples: Sequence[dict[str, Any]],
    grid: int,
    *,
    max_new_tokens: int,
    batch_size: int = 32,
) -> dict[str, float]:
    """Held-out accuracy per task of a (composed) model on the text view: no pixels, cells as tokens."""
    tok = processor.tokenizer
    eos, pad = int(tok.convert_tokens_to_ids("<|im_end|>")), int(tok.pad_token_id)
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            inputs = processor.pad_prompts([text_prompt_inputs(processor, s, grid) for s in chunk])
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad
            )
            for sample, row in zip(chunk, out[:, inputs["input_ids"].shape[1] :].tolist(), strict=True):
                ids = row[: next((k for k, t in enumerate(row) if t in (eos, pad)), len(row))]
                scores.append(float(verify(sample, tok.decode(ids, skip_special_tokens=False))))
    finally:
        model.train(was_training)
    return per_task(samples, scores)
