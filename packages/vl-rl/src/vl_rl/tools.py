"""Tool-integrated rollouts ("thinking with images"): crop / zoom calls whose results come back as new images.

Implements the multi-turn tool use of Qwen3-VL's and GLM-4.5V's "thinking with images" RL
(REFERENCE.md section 5). The model may end a turn with a call in Qwen's format::

    <tool_call>{"name": "crop", "bbox_2d": [x1, y1, x2, y2]}</tool_call>

(``"arguments": {...}`` nesting is accepted too; coordinates are 0-1000 relative to the sample's first
image; ``zoom`` also takes ``"factor"``, 1-4, default 2). The tool runs with Pillow and its result is
appended as a new user turn ``<tool_response>`` holding the image (new ``<|image_pad|>`` tokens and pixel
values) and generation continues, up to ``max_turns`` tool calls. Tool turns are masked out of the loss
(``completion_mask`` 0). A malformed call gets an error-message turn instead of an image, never a crash.

A turn truncated inside an open ``<think>`` ends the row; with ``force_answer`` (on by default, as in
:class:`~vl_rl.rollout.HFRolloutEngine`) the cue that closes the block is appended after the whole
conversation so far, tool images included, and a short answer is generated (the cue masked out).

Notation: ``R`` rows (``N * G``), boxes ``[x1, y1, x2, y2]`` in 0-1000 coordinates.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from .rollout import HFRolloutEngine, Rollout, _extend_prompt, encode_prompt

__all__ = ["DEFAULT_TOOLS", "ToolError", "ToolRolloutEngine", "crop", "parse_tool_call", "zoom"]

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_OPEN = "<tool_call>"


class ToolError(ValueError):
    """A tool call that cannot run (bad JSON, unknown tool, bad box); its message goes back to the model."""


def _box(args: Mapping[str, Any], size: tuple[int, int]) -> tuple[int, int, int, int]:
    raw = args.get("bbox_2d")
    if not isinstance(raw, (list, tuple)) or len(raw) != 4 or not all(isinstance(v, (int, float)) for v in raw):
        raise ToolError(f"bbox_2d must be a list of 4 numbers in 0-1000, got {raw!r}")
    x1, y1, x2, y2 = (float(v) for v in raw)
    if not (0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000):
        raise ToolError(f"bbox_2d must satisfy 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000, got {list(raw)}")
    w, h = size
    left, top = int(x1 * w / 1000), int(y1 * h / 1000)
    right, bottom = max(left + 1, round(x2 * w / 1000)), max(top + 1, round(y2 * h / 1000))
    return left, top, right, bottom


def crop(image: Image.Image, args: Mapping[str, Any]) -> Image.Image:
    """The region ``bbox_2d`` (0-1000 coordinates) of ``image``.

    Raises:
        ToolError: A missing or invalid box.
    """
    return image.crop(_box(args, image.size))


def zoom(image: Image.Image, args: Mapping[str, Any]) -> Image.Image:
    """The region ``bbox_2d`` enlarged ``factor`` times (1-4, default 2; bicubic).

    Raises:
        ToolError: A missing or invalid box or factor.
    """
    factor = args.get("factor", 2)
    if not isinstance(factor, (int, float)) or not 1 <= factor <= 4:
        raise ToolError(f"factor must be a number in [1, 4], got {factor!r}")
    region = crop(image, args)
    size = (max(1, round(region.width * factor)), max(1, round(region.height * factor)))
    return region.resize(size, Image.Resampling.BICUBIC)


Tool = Callable[[Image.Image, Mapping[str, Any]], Image.Image]
DEFAULT_TOOLS: dict[str, Tool] = {"crop": crop, "zoom": zoom}
"""The image tools by name."""


def parse_tool_call(text: str) -> dict[str, Any] | None:
    """The last ``<tool_call>`` of a turn as ``{"name": ..., **arguments}``; None when the turn has none.

    Raises:
        ToolError: An unclosed call, invalid JSON, or a call without a string ``name``.
    """
    calls = _CALL.findall(text)
    if not calls:
        if _OPEN in text:
            raise ToolError("unclosed <tool_call>: close it with </tool_call>")
        return None
    try:
        call = json.loads(calls[-1])
    except json.JSONDecodeError as exc:
        raise ToolError(f"tool call is not valid JSON ({exc.msg})") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ToolError('tool call must be a JSON object with a "name"')
    args = call.get("arguments", {})
    if not isinstance(args, dict):
        raise ToolError('"arguments" must be a JSON object')
    return {**{k: v for k, v in call.items() if k != "arguments"}, **args}


def _first_image(sample: Mapping[str, Any]) -> Image.Image | None:
    for message in sample.get("messages", []):
        if message["role"] == "user" and isinstance(message["content"], list):
            for item in message["content"]:
                if item["type"] == "image":
                    return item["image"] if isinstance(item["image"], Image.Image) else None
    return None


class ToolRolloutEngine(HFRolloutEngine):
    """:class:`~vl_rl.rollout.HFRolloutEngine` with a multi-turn crop / zoom loop (see the module docstring).

    Args:
        model: The policy.
        processor: Its processor.
        max_turns: Most tool calls per response.
        tools: Tools by name (default :data:`DEFAULT_TOOLS`).
        **kwargs: :class:`~vl_rl.rollout.HFRolloutEngine` options (``max_new_tokens`` is per turn).

    Raises:
        ValueError: ``max_turns < 0``.
    """

    def __init__(
        self, model: Any, processor: Any, *, max_turns: int = 2, tools: Mapping[str, Tool] | None = None, **kwargs: Any
    ) -> None:
        if max_turns < 0:
            raise ValueError(f"max_turns must be >= 0, got {max_turns}")
        super().__init__(model, processor, **kwargs)
        self.max_turns = max_turns
        self.tools = dict(DEFAULT_TOOLS if tools is None else tools)

    def run_tool(self, sample: Mapping[str, Any], turn_text: str) -> tuple[Image.Image | None, str | None, bool]:
        """``(image, error, called)`` for one turn: the tool's image, or an error message, or nothing."""
        try:
            call = parse_tool_call(turn_text)
            if call is None:
                return None, None, False
            name = call.pop("name")
            if name not in self.tools:
                raise ToolError(f"unknown tool {name!r}; tools are {sorted(self.tools)}")
            image = _first_image(sample)
            if image is None:
                raise ToolError("this question has no image to use the tool on")
            return self.tools[name](image, call), None, True
        except ToolError as exc:
            return None, f"Error: {exc}", True

    def _tool_turn(self, image: Image.Image | None, error: str | None, thinking: bool) -> dict[str, torch.Tensor]:
        body = "<|vision_start|><|image_pad|><|vision_end|>" if image is not None else str(error)
        text = f"\n<|im_start|>user\n<tool_response>\n{body}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
        if not thinking:
            text += "<think>\n\n</think>\n\n"
        enc = self.processor(text=[text], images=[image] if image is not None else None, add_special_tokens=False)
        out = {"input_ids": torch.as_tensor(enc["input_ids"]).reshape(-1)}
        if image is not None:
            out["pixel_values"] = torch.as_tensor(enc["pixel_values"])
            out["image_grid_thw"] = torch.as_tensor(enc["image_grid_thw"])
        return out

    def _context(
        self, prompt: Mapping[str, torch.Tensor], ids: list[int], extra: list[dict[str, torch.Tensor]]
    ) -> dict:
        row = _extend_prompt(prompt, ids, self.image_token_id)
        if extra:
            row["pixel_values"] = torch.cat(
                [t for t in [prompt.get("pixel_values")] if t is not None] + [e["pixel_values"] for e in extra]
            )
            row["image_grid_thw"] = torch.cat(
                [t for t in [prompt.get("image_grid_thw")] if t is not None] + [e["image_grid_thw"] for e in extra]
            )
        return row

    def generate(self, samples: Sequence[dict[str, Any]], group_size: int, *, greedy: bool = False) -> Rollout:
        """``group_size`` multi-turn responses to each sample (tool turns masked out of the loss).

        Raises:
            ValueError: No samples or ``group_size < 1``.
        """
        if not samples or group_size < 1:
            raise ValueError(f"need at least one sample and group_size >= 1, got {len(samples)} and {group_size}")
        row_samples = [s for s in samples for _ in range(group_size)]
        rows = [
            e for e in (encode_prompt(self.processor, s, self.thinking) for s in samples) for _ in range(group_size)
        ]
        count = len(rows)
        completions: list[list[int]] = [[] for _ in range(count)]
        trained: list[list[bool]] = [[] for _ in range(count)]
        extra: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(count)]
        truncated, calls, done = [False] * count, [0] * count, [False] * count
        tok = self.processor.tokenizer
        for turn in range(self.max_turns + 1):
            active = [i for i in range(count) if not done[i]]
            for start in range(0, len(active), self.batch_size):
                chunk = active[start : start + self.batch_size]
                contexts = [self._context(rows[i], completions[i], extra[i]) for i in chunk]
                batch = self.processor.pad_prompts(contexts)
                out = self._generate(batch, self.max_new_tokens, greedy)
                for i, ids in zip(chunk, out[:, batch["input_ids"].shape[1] :].tolist(), strict=True):
                    kept, cut = self._cut(ids)
                    completions[i] += kept
                    trained[i] += [True] * len(kept)
                    text = str(tok.decode(kept, skip_special_tokens=False))
                    if cut or turn == self.max_turns:
                        truncated[i], done[i] = cut, True
                        continue
                    image, error, called = self.run_tool(row_samples[i], text)
                    if not called:
                        done[i] = True
                        continue
                    calls[i] += 1
                    thinking = self.thinking if self.thinking is not None else bool(row_samples[i].get("reasoning"))
                    response = self._tool_turn(image, error, thinking)
                    completions[i] += response["input_ids"].tolist()
                    trained[i] += [False] * int(response["input_ids"].numel())
                    if image is not None:
                        extra[i].append(response)
            if all(done):
                break
        if self.force_answer and self.answer_tokens > 0:
            context = lambda i, tail: self._context(rows[i], tail, extra[i])
            self._force_answers(context, completions, trained, truncated, greedy)
        return self.assemble(list(samples), group_size, rows, completions, trained, truncated, extra, calls)
