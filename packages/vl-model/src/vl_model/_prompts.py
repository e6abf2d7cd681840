"""Prompt encoding for generation (rollouts, teachers, evaluation), as methods of ``VLProcessor``.

A prompt is a list of chat messages whose content items carry their media inline, the
transformers convention: ``{"type": "image", "image": <PIL image | array | path>}``,
``{"type": "video", "video": <frames | array | path>, "fps": <source rate or None>}``,
``{"type": "text", "text": ...}``. :meth:`PromptEncoding.encode_prompt` renders it with the chat
template and the generation prompt, preprocesses the media in order and returns one ``[1, P]`` row;
:meth:`PromptEncoding.pad_prompts` left-pads such rows into a batch for ``generate``.

Notation: ``B`` prompts, ``P`` longest prompt, ``N`` patches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

__all__ = ["VISUAL_KEYS", "PromptEncoding", "split_media"]

VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
"""Visual inputs, concatenated over prompts in row order (the order the model's scatter reads)."""


def split_media(
    messages: Sequence[Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], list[Any], list[Any], list[float | None]]:
    """``(template messages, images, videos, video source rates)``: media taken out of the items, in order.

    Raises:
        ValueError: A content item that is not an image, video or text item (its index named).
    """
    turns: list[dict[str, Any]] = []
    images: list[Any] = []
    videos: list[Any] = []
    rates: list[float | None] = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            items: list[dict[str, Any]] = []
            for j, item in enumerate(content):
                kind = item.get("type") if isinstance(item, Mapping) else None
                if kind == "image":
                    images.append(item["image"])
                    items.append({"type": "image"})
                elif kind == "video":
                    videos.append(item["video"])
                    rates.append(item.get("fps"))
                    items.append({"type": "video"})
                elif kind == "text":
                    items.append({"type": "text", "text": item["text"]})
                else:
                    raise ValueError(f"message {i} item {j}: expected an image, video or text item, got {item!r:.80}")
            content = items
        turns.append({**message, "content": content})
    return turns, images, videos, rates


class PromptEncoding:
    """``encode_prompt`` / ``pad_prompts`` for a processor with ``tokenizer``, ``chat_template`` and ``__call__``."""

    tokenizer: Any
    chat_template: Any

    if TYPE_CHECKING:

        def __call__(self, *args: Any, **kwargs: Any) -> Any: ...  # the processor's own __call__

    def render_prompt(
        self, messages: Sequence[Mapping[str, Any]], *, thinking: bool | None = None, **template_kwargs: Any
    ) -> tuple[str, list[Any], list[Any], list[float | None]]:
        """``(prompt text, images, videos, video rates)``: the template over ``messages`` plus the generation prompt.

        Args:
            messages: Every turn before the response to generate (media inline, see the module docstring).
            thinking: ``False`` passes ``enable_thinking=False`` (the template's non-thinking prompt);
                ``None`` / ``True`` leave the template's default and its soft switches.
            **template_kwargs: Further template variables (``tools``, ``add_vision_id``, ...).
        """
        from transformers.utils.chat_template_utils import render_jinja_template

        turns, images, videos, rates = split_media(messages)
        if thinking is False:
            template_kwargs["enable_thinking"] = False
        rendered, _ = cast(Any, render_jinja_template)(
            conversations=[turns],
            chat_template=self.chat_template,
            add_generation_prompt=True,
            **template_kwargs,
            **self.tokenizer.special_tokens_map,
        )
        return str(rendered[0]), images, videos, rates

    def encode_prompt(
        self, messages: Sequence[Mapping[str, Any]], *, thinking: bool | None = None, **template_kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Model inputs of one prompt: ``input_ids [1, P]``, ``mm_token_type_ids`` and its media's pixels and grids.

        Videos are sampled as in training (``fps`` of each video item is its source rate).
        See :meth:`render_prompt` for the arguments.
        """
        text, images, videos, rates = self.render_prompt(messages, thinking=thinking, **template_kwargs)
        enc = self(
            text=[text],
            images=images or None,
            videos=videos or None,
            video_fps=rates if videos else None,
            add_special_tokens=False,
        )
        keys = ("input_ids", "mm_token_type_ids", *VISUAL_KEYS)
        return {k: torch.as_tensor(enc[k]) for k in keys if k in enc and enc[k] is not None}

    def pad_prompts(
        self, encoded: Sequence[Mapping[str, torch.Tensor]], *, length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Left-pad encoded prompts (to ``length``, default the longest) into one batch.

        Returns:
            ``input_ids``, ``attention_mask`` and ``mm_token_type_ids`` ``[B, P]`` (padding: the tokenizer's
            pad id, mask 0, type 0) and the visual inputs concatenated in row order.

        Raises:
            ValueError: No prompts, a prompt that is not one row, or a tokenizer without a pad token.
        """
        if not encoded:
            raise ValueError("pad_prompts needs at least one prompt")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token before padding prompts")
        bad = [i for i, e in enumerate(encoded) if e["input_ids"].dim() == 2 and e["input_ids"].shape[0] != 1]
        if bad:
            raise ValueError(f"prompts {bad} are not single rows [1, P]")
        width = max([int(e["input_ids"].shape[-1]) for e in encoded] + [length or 0])
        ids, mask, types = [], [], []
        for e in encoded:
            row = e["input_ids"].reshape(-1)
            pad = width - row.numel()
            ids.append(torch.cat([row.new_full((pad,), int(pad_id)), row]))
            mask.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(row.numel(), dtype=torch.long)]))
            kinds = e.get("mm_token_type_ids")
            kinds = kinds.reshape(-1).long() if kinds is not None else torch.zeros_like(row)
            types.append(torch.cat([torch.zeros(pad, dtype=torch.long), kinds]))
        batch = {
            "input_ids": torch.stack(ids),
            "attention_mask": torch.stack(mask),
            "mm_token_type_ids": torch.stack(types),
        }
        for key in VISUAL_KEYS:
            parts = [e[key] for e in encoded if key in e]
            if parts:
                batch[key] = torch.cat(parts)
        return batch
