"""Prompt encoding for generation (rollouts, teachers, evaluation), as methods of ``VLProcessor``.

A prompt is a list of chat messages whose content items carry their media inline, the
transformers convention: ``{"type": "image", "image": <PIL image | array | path>}``,
``{"type": "video", "video": <frames | array | path>, "fps": <source rate or None>}``,
``{"type": "text", "text": ...}``. :meth:`PromptEncoding.encode_prompt` renders it with the chat
template and the generation prompt, preprocesses the media in order and returns one ``[1, P]`` row;
:meth:`PromptEncoding.pad_prompts` left-pads such rows into a batch for ``generate``.

:meth:`PromptEncoding.render_conversation` renders a whole conversation for training and says where the
assistant's turns are (character spans), for any chat template: from its ``{% generation %}`` blocks when
it has them, else turn by turn (each assistant turn is what the template adds after the generation
prompt of the turns before it), so templates without markers (official Qwen3-VL ones) label too.

Notation: ``B`` prompts, ``P`` longest prompt, ``N`` patches.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

__all__ = ["VISUAL_KEYS", "PromptEncoding", "has_generation_markers", "split_media"]

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(template: str) -> bool:
    """Whether a chat template marks assistant text with ``{% generation %}`` blocks."""
    return bool(_GENERATION.search(template))


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
        turns, images, videos, rates = split_media(messages)
        if thinking is False:
            template_kwargs["enable_thinking"] = False
        text, _ = self._render(turns, add_generation_prompt=True, **template_kwargs)
        return text, images, videos, rates

    def _render(self, turns: Sequence[Mapping[str, Any]], **kwargs: Any) -> tuple[str, list[list[int]]]:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, spans = cast(Any, render_jinja_template)(
            conversations=[list(turns)],
            chat_template=self.chat_template,
            **kwargs,
            **self.tokenizer.special_tokens_map,
        )
        return str(rendered[0]), [[int(a), int(b)] for a, b in (spans[0] if spans else [])]

    def render_conversation(
        self, turns: Sequence[Mapping[str, Any]], **template_kwargs: Any
    ) -> tuple[str, list[list[int]]]:
        """``(text, spans)``: the whole conversation rendered, and the ``[start, end)`` characters of each
        assistant turn (its text and end-of-turn token), for assistant-only labels.

        Args:
            turns: Template messages (media already split out, see :func:`split_media`).
            **template_kwargs: Further template variables (``enable_thinking``, ``tools``, ...).

        Raises:
            ValueError: A template without generation markers that does not render an assistant turn as a
                continuation of the turns before it (the turn named), or an assistant turn first.
        """
        if has_generation_markers(str(self.chat_template)):
            return self._render(turns, return_assistant_tokens_mask=True, **template_kwargs)
        text, _ = self._render(turns, **template_kwargs)
        spans = []
        for k, message in enumerate(turns):
            if message.get("role") != "assistant":
                continue
            if k == 0:
                raise ValueError("turn 0 is an assistant turn: a conversation starts with a user (or system) turn")
            before, _ = self._render(turns[:k], add_generation_prompt=True, **template_kwargs)
            upto, _ = self._render(turns[: k + 1], **template_kwargs)
            if upto.startswith(before) and text.startswith(upto):
                spans.append([len(before), len(upto.rstrip())])
            else:  # the template renders a last turn differently (e.g. Qwen3's thinking block)
                spans.append(self._locate_turn(text, turns, k, template_kwargs))
        return text, spans

    def _locate_turn(
        self, text: str, turns: Sequence[Mapping[str, Any]], k: int, template_kwargs: dict[str, Any]
    ) -> list[int]:
        """Assistant turn ``k`` inside ``text``: after the history and the assistant header, up to its end token."""
        history, _ = self._render(turns[:k], **template_kwargs)
        prompt, _ = self._render(turns[:k], add_generation_prompt=True, **template_kwargs)
        end_token = self.tokenizer.eos_token
        if not (text.startswith(history) and prompt.startswith(history)) or not end_token:
            raise ValueError(
                f"the chat template has no {{% generation %}} markers and renders assistant turn {k} differently "
                "depending on the turns after it, so its tokens cannot be located: add {% generation %} ... "
                "{% endgeneration %} around assistant text in the template"
            )
        header, rest = prompt[len(history) :], text[len(history) :]
        shared = next(
            (i for i, (a, b) in enumerate(zip(header, rest, strict=False)) if a != b), min(len(header), len(rest))
        )
        start = len(history) + shared
        end = text.find(end_token, start)
        if end < 0:
            raise ValueError(f"assistant turn {k} has no end token {end_token!r} in the rendered conversation")
        return [start, end + len(end_token)]

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
            # nested per prompt (transformers' convention), so a video given as frame paths stays one video
            videos=[videos] if videos else None,
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
