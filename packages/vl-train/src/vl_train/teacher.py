"""Teacher generation for off-policy distillation, with the adaptive repetition penalty.

Implements the data side of strong-to-weak distillation (Qwen3-VL technical report, arXiv 2511.21631,
section 4; REFERENCE.md section 4) and Skywork-R1V's adaptive-length chain-of-thought distillation
(arXiv 2504.05599, section 3): a teacher answers every prompt of a dataset, and queries predicted to
need a short answer are generated with a *higher* repetition penalty, which curbs the over-long,
repetitive reasoning a strong reasoner produces on easy questions.

How "needs a short answer" is predicted is **our choice** (Skywork-R1V uses a learned difficulty
estimate): :func:`predict_short_answer` says yes for closed-form answer types (``choice``, ``count``,
``number``) and samples with ``options``, no for open ones (``caption``, ``boxes``, ``timestamps``),
and otherwise yes for prompts that ask for a number, one word or yes/no, or have at most
``short_prompt_chars`` (40) characters. Pass any
``short_answer_predictor(sample) -> bool`` to replace it.

The teacher's response becomes the sample's final assistant turn; a ``<think>...</think>`` block goes
to the sample's ``reasoning`` field (the thinking format of :mod:`vl_train.data.render`). Each output
sample records ``teacher = {"repetition_penalty", "predicted_short", "num_tokens"}``.

Notation: ``rho`` the repetition penalty (1 = none; HF's CTRL-style penalty divides the positive
logits of already generated tokens by ``rho``).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .data.format import validate_sample, write_jsonl
from .data.messages import prompt_inputs

__all__ = ["generate_teacher_data", "predict_short_answer", "split_reasoning"]

_SHORT_TYPES = {"choice", "count", "number"}
_LONG_TYPES = {"caption", "boxes", "timestamps"}
_SHORT_PROMPT = re.compile(r"answer with (a|one) (number|word)|yes or no|one word|single word", re.IGNORECASE)
_PLACEHOLDER = {"role": "assistant", "content": ""}
_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)


def _last_user_text(sample: Mapping[str, Any]) -> str:
    for message in reversed(sample["messages"]):
        if message["role"] == "user":
            content = message["content"]
            if isinstance(content, str):
                return content
            return " ".join(item["text"] for item in content if item.get("type") == "text")
    return ""


def predict_short_answer(sample: Mapping[str, Any], *, short_prompt_chars: int = 40) -> bool:
    """Our default predictor of "this query needs a short answer" (see the module docstring)."""
    if sample.get("answer_type") in _SHORT_TYPES or sample.get("options"):
        return True
    if sample.get("answer_type") in _LONG_TYPES:
        return False
    text = _last_user_text(sample)
    return bool(_SHORT_PROMPT.search(text)) or len(text) <= short_prompt_chars


def split_reasoning(response: str) -> tuple[str | None, str]:
    """``(reasoning, answer)`` of a response that may open with a ``<think>...</think>`` block."""
    match = _THINK.match(response)
    if match is None:
        return None, response.strip()
    reasoning = match.group(1).strip()
    return reasoning or None, response[match.end() :].strip()


def _decode(tokenizer: Any, tokens: torch.Tensor, stop_ids: set[int]) -> str:
    ids = tokens.tolist()
    for k, t in enumerate(ids):
        if t in stop_ids:
            ids = ids[:k]
            break
    text = str(tokenizer.decode(ids, skip_special_tokens=False))
    for special in (tokenizer.pad_token, tokenizer.eos_token):
        if special:
            text = text.replace(special, "")
    return text


@torch.no_grad()
def generate_teacher_data(
    teacher_model: Any,
    processor: Any,
    samples: Iterable[Mapping[str, Any]],
    *,
    max_new_tokens: int,
    short_answer_predictor: Callable[[Mapping[str, Any]], bool] | None = None,
    base_penalty: float = 1.0,
    short_penalty: float = 1.3,
    do_sample: bool = False,
    temperature: float = 1.0,
    output: str | os.PathLike[str] | None = None,
    **generate_kwargs: Any,
) -> list[dict[str, Any]]:
    """Let the teacher answer every sample, with the adaptive repetition penalty; optionally write JSONL.

    Args:
        teacher_model: A generating VLM (``generate``) sharing ``processor``'s tokenizer.
        processor: A :class:`vl_model.VLProcessor`.
        samples: Samples in the suite's format; a final assistant turn, if any, is replaced.
        max_new_tokens: Longest response.
        short_answer_predictor: ``sample -> bool``; default :func:`predict_short_answer`.
        base_penalty: ``rho`` for other queries.
        short_penalty: ``rho`` for queries predicted to need short answers.
        do_sample: Sample (True) or decode greedily (False).
        temperature: Sampling temperature.
        output: Write the samples to this ``.jsonl`` (media next to it) when given.
        **generate_kwargs: Passed to ``generate``.

    Returns:
        The samples with the teacher's responses (``reasoning`` set from a ``<think>`` block).

    Raises:
        ValueError: Penalties below 1, ``max_new_tokens < 1`` or a malformed sample.
    """
    if base_penalty < 1.0 or short_penalty < 1.0:
        raise ValueError(f"repetition penalties must be >= 1, got base {base_penalty} and short {short_penalty}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    predictor = short_answer_predictor or predict_short_answer
    tokenizer = processor.tokenizer
    stop_ids = {int(t) for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    teacher_model.eval()
    results: list[dict[str, Any]] = []
    for sample in samples:
        if not any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in sample.get("messages") or []):
            # a prompt-only sample is fine here: check it as it will be, with the teacher's answer
            validate_sample({**sample, "messages": [*sample.get("messages", []), _PLACEHOLDER]})
        else:
            validate_sample(sample)
        short = bool(predictor(sample))
        penalty = short_penalty if short else base_penalty
        inputs = prompt_inputs(processor, sample, thinking=True)  # the template's default: the teacher may think
        sampling = {"temperature": temperature} if do_sample else {}
        sequences = teacher_model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            repetition_penalty=penalty,
            do_sample=do_sample,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
            **generate_kwargs,
        )
        new_tokens = sequences[0, inputs["input_ids"].shape[1] :]
        reasoning, answer = split_reasoning(_decode(tokenizer, new_tokens, stop_ids))
        out = {k: v for k, v in copy.copy(dict(sample)).items() if k not in ("_source", "reasoning")}
        messages = list(out["messages"])
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        out["messages"] = [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        if reasoning is not None:
            out["reasoning"] = reasoning
        ids = new_tokens.tolist()
        n = next((k + 1 for k, t in enumerate(ids) if t in stop_ids), len(ids))
        out["teacher"] = {"repetition_penalty": penalty, "predicted_short": short, "num_tokens": n}
        results.append(out)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(results, output)
    return results
