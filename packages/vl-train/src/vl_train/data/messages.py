"""From a suite sample to chat messages with decoded media, and to the model inputs of its prompt.

A sample (``vl_train.data.format``) references its media (PIL images, paths, bytes, frame lists);
:func:`sample_messages` decodes them into the content items (errors name the sample, its
``file:line`` and the item). :func:`prompt_inputs` encodes every turn before the final assistant
turn with the processor's generation prompt (``VLProcessor.encode_prompt``): what rollouts, teachers
and evaluation feed to ``generate``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .format import DataError, load_image, load_video, sample_location

__all__ = ["prompt_inputs", "sample_messages", "wants_thinking"]


def sample_messages(sample: Mapping[str, Any], *, prompt_only: bool = False) -> list[dict[str, Any]]:
    """The sample's messages with every image and video decoded (frame lists stay lists of frames).

    Args:
        sample: A suite sample (``messages`` with ``image`` / ``video`` / ``text`` items).
        prompt_only: Drop a final assistant turn (the answer a generation should produce).

    Raises:
        DataError: A missing or corrupt medium (sample id, location and item named), or a prompt
            without a user turn.
    """
    messages = list(sample.get("messages") or [])
    if prompt_only and messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if prompt_only and not any(m.get("role") == "user" for m in messages):
        sid = sample.get("id")
        raise DataError(
            "has no user turn to prompt with",
            sample_id=None if sid is None else str(sid),
            location=sample_location(sample),
        )
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            items: list[Any] = []
            for j, item in enumerate(content):
                kind = item.get("type") if isinstance(item, Mapping) else None
                if kind == "image":
                    items.append({**item, "image": load_image(item["image"], sample, f"message {i} image (item {j})")})
                elif kind == "video":
                    video = load_video(item["video"], sample, f"message {i} video (item {j})")
                    items.append({**item, "video": video})
                else:
                    items.append(item)
            content = items
        out.append({**message, "content": content})
    return out


def wants_thinking(sample: Mapping[str, Any], thinking: bool | None) -> bool:
    """``thinking`` when given, else whether the sample carries ``reasoning`` (the SFT rendering's rule)."""
    return bool(sample.get("reasoning")) if thinking is None else bool(thinking)


def prompt_inputs(processor: Any, sample: Mapping[str, Any], thinking: bool | None = None) -> dict[str, torch.Tensor]:
    """Model inputs of a sample's prompt: ``input_ids [1, P]``, ``mm_token_type_ids``, pixels and grids.

    Args:
        processor: A :class:`vl_model.VLProcessor`.
        sample: A suite sample; a final assistant turn is dropped.
        thinking: Open a thinking response (True) or the template's non-thinking prompt (False);
            ``None``: thinking exactly when the sample has ``reasoning``.

    Raises:
        DataError: Missing media or no user turn (see :func:`sample_messages`), or media the processor
            rejects (frames of different sizes, an unreadable video file, ...): the sample named.
    """
    messages = sample_messages(sample, prompt_only=True)
    try:
        return processor.encode_prompt(messages, thinking=wants_thinking(sample, thinking))
    except (OSError, TypeError, ValueError) as exc:
        sid = sample.get("id")
        raise DataError(
            f"its prompt could not be encoded: {exc}",
            sample_id=None if sid is None else str(sid),
            location=sample_location(sample),
        ) from exc
