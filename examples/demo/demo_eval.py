"""Held-out accuracy of the demo model: batched greedy generation, scored with the synthetic verifier.

Prompts are rendered with the processor's chat template (every turn before the final assistant turn,
plus the generation prompt), left-padded into batches and answered with ``model.generate`` (greedy,
KV cache on). Each response is scored with ``vl_train.data.synthetic.verify`` (1 right, 0 wrong,
partial credit for boxes and timestamps); the score of a task is the mean over its samples.

Notation: ``B`` prompts per batch, ``P`` the longest prompt of a batch in tokens.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vl_train.data.messages import prompt_inputs
from vl_train.data.synthetic import verify

__all__ = [
    "CHANCE",
    "EvalSummary",
    "chance_level",
    "evaluate_samples",
    "generate_answers",
    "majority_baseline",
]

CHANCE: dict[str, float] = {
    "count": 1 / 9,  # counts 0-8 are possible answers
    "colour": 1 / 6,  # six colours
    "spatial": 1 / 2,
    "compare": 1 / 2,
    "caption": 0.0,
    "grounding": 0.0,
    "video_appear": 0.0,
    "video_move": 0.0,
    "text_math": 0.0,
}
"""Expected accuracy of a uniform guess among the valid answers (0 for open-ended tasks)."""


def chance_level(task: str) -> float:
    """Accuracy of a uniform random guess on ``task`` (0 for open-ended answers).

    Raises:
        ValueError: An unknown task name.
    """
    if task not in CHANCE:
        raise ValueError(f"unknown task {task!r}; known tasks are {sorted(CHANCE)}")
    return CHANCE[task]


def _reference_answer(sample: Mapping[str, Any]) -> str:
    content = sample["messages"][-1]["content"]
    return " ".join(item["text"] for item in content if item.get("type") == "text")


def majority_baseline(
    samples: Sequence[Mapping[str, Any]], reward_fn: Callable[[dict[str, Any], str], float] = verify
) -> dict[str, float]:
    """Per task, the score of always giving that task's most frequent reference answer.

    Uniform chance understates what a model learns from the answer distribution alone (on counting,
    "1" is right for about half of the held-out prompts); this is the bar accuracy must clear to show
    that the model reads the image.
    """
    by_task: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for sample in samples:
        by_task[str(sample["task"])].append(sample)
    out: dict[str, float] = {}
    for task, group in by_task.items():
        answers = [_reference_answer(s) for s in group]
        common = max(sorted(set(answers)), key=answers.count)
        out[task] = math.fsum(float(reward_fn(dict(s), common)) for s in group) / len(group)
    return out


@dataclass
class EvalSummary:
    """Scores of one evaluation.

    Attributes:
        per_task: Mean score per task.
        count: Samples per task.
        mean: Mean score over all samples.
        responses: Every decoded response, in sample order.
        scores: Every score, in sample order.
    """

    per_task: dict[str, float]
    count: dict[str, int]
    mean: float
    responses: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def _decode(tokenizer: Any, row: torch.Tensor, stop: set[int]) -> str:
    ids = row.tolist()
    end = next((k for k, t in enumerate(ids) if t in stop), len(ids))
    return str(tokenizer.decode(ids[:end], skip_special_tokens=False))


@torch.no_grad()
def generate_answers(
    model: Any, processor: Any, samples: Sequence[Mapping[str, Any]], *, max_new_tokens: int, thinking: bool
) -> list[str]:
    """Greedy responses of ``model`` to one left-padded batch of ``samples`` (text up to the first stop token).

    Raises:
        ValueError: ``max_new_tokens < 1`` or an empty batch.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not samples:
        raise ValueError("generate_answers needs at least one sample")
    tok = processor.tokenizer
    inputs = processor.pad_prompts([prompt_inputs(processor, s, thinking=thinking) for s in samples])
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.pad_token_id,
        )
    finally:
        model.train(was_training)
    stop = {int(t) for t in (tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>"))}
    prompt_len = inputs["input_ids"].shape[1]
    return [_decode(tok, row, stop) for row in out[:, prompt_len:]]


def evaluate_samples(
    model: Any,
    processor: Any,
    samples: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 12,
    thinking: bool = False,
    reward_fn: Callable[[Any, str], float] = verify,
    progress: bool = True,
    desc: str = "eval",
) -> EvalSummary:
    """Score greedy answers to ``samples`` per task (see the module docstring).

    Args:
        model: A generating VLM.
        processor: Its processor.
        samples: Synthetic samples (``task``, ``answer``, ``answer_type``).
        batch_size: Prompts per ``generate`` call.
        max_new_tokens: Longest response.
        thinking: Let the model think first (else the prompt closes an empty think block).
        reward_fn: ``(sample, response) -> score``.
        progress: Show a tqdm bar.
        desc: The bar's label.

    Raises:
        ValueError: ``batch_size < 1`` or no samples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not samples:
        raise ValueError("evaluate_samples needs at least one sample")
    from tqdm.auto import tqdm  # type: ignore[import-untyped, unused-ignore]

    responses: list[str] = []
    # similar prompt lengths per batch waste less padding: batch by task, restore the order afterwards
    order = sorted(range(len(samples)), key=lambda i: (str(samples[i].get("task")), i))
    by_index: dict[int, str] = {}
    bar = tqdm(total=len(samples), desc=desc, unit="sample", disable=None if progress else True, leave=False)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        answers = generate_answers(
            model, processor, [samples[i] for i in chunk], max_new_tokens=max_new_tokens, thinking=thinking
        )
        by_index.update(zip(chunk, answers))
        bar.update(len(chunk))
    bar.close()
    responses = [by_index[i] for i in range(len(samples))]
    scores = [float(reward_fn(s, r)) for s, r in zip(samples, responses)]
    totals: dict[str, list[float]] = defaultdict(list)
    for sample, score in zip(samples, scores):
        totals[str(sample.get("task"))].append(score)
    per_task = {task: math.fsum(v) / len(v) for task, v in sorted(totals.items())}
    count = {task: len(v) for task, v in sorted(totals.items())}
    return EvalSummary(per_task, count, math.fsum(scores) / len(scores), responses, scores)
