"""The text view of a synthetic sample: every image replaced by one token per scene cell.

The example's language models are pretrained on text before they ever see a visual token (as real
LLMs are). Their text is the synthetic dataset's own prompts and answers, with each image written as
what a perfect captioner would say about it: one token per ``grid``-px cell, row-major (the order of
the merged visual tokens), naming the cell's shape (``"<c:red_circle>"``) or ``"<c:empty>"``. With
``grid = patch_size * spatial_merge_size`` and no resizing, the text view has exactly the token
layout of the multimodal prompt: each ``<|image_pad|>`` becomes the token of its cell. So the adapter
only has to map each merged visual token onto the word the LLM already reads there.

The cell contents are read back from the pixels (:func:`cell_words`): the dataset draws every shape
pixel in its colour's exact RGB value, far from every grey of the background, and each shape inside
one cell; the kind follows from the shape's tight box (a square fills it; a triangle fills its bottom
row; a circle fills about 3/4 of it, a star under 1/2).

Notation: ``W x H`` image pixels; ``g`` the grid (cell side); cells ``(H / g) x (W / g)``, row-major.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import PIL.Image
import torch
from at_tokens import cell_word

from vl_train.data._shapes import COLOURS
from vl_train.data.messages import prompt_inputs
from vl_train.data.render import RenderedSample, SampleRenderer

__all__ = [
    "CELLS_PROMPT",
    "CellListing",
    "TextView",
    "cell_listing",
    "cell_words",
    "sample_images",
    "text_prompt_inputs",
    "to_text_view",
]

CELLS_PROMPT = "List every cell of the image, row by row."
"""The question of the ``cells`` alignment task."""

_CODES = tuple((r << 16) | (g << 8) | b for r, g, b in COLOURS.values())
_NAMES = tuple(COLOURS)


def _kind(mask: np.ndarray) -> str:
    """The kind of the one shape in boolean ``mask`` (its cell), from its tight box."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fill, bottom = float(box.mean()), float(box[-1].mean())
    if bottom >= 0.9:  # the base is a full row: a square, or a triangle's base
        return "square" if fill >= 0.95 else "triangle"
    return "circle" if fill >= 0.65 else "star"


def cell_words(image: PIL.Image.Image, grid: int) -> list[str]:
    """The token of every ``grid``-px cell of a synthetic image, row-major.

    Raises:
        ValueError: Sides that are not multiples of ``grid``, or a cell holding two colours (not a
            one-shape-per-cell scene), each with the cell named.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    height, width = pixels.shape[:2]
    if grid < 1 or height % grid or width % grid:
        raise ValueError(f"a {width}x{height} image does not split into {grid} px cells")
    codes = (pixels[:, :, 0] << 16) | (pixels[:, :, 1] << 8) | pixels[:, :, 2]  # [H, W], one int per RGB
    rows, columns = height // grid, width // grid
    cells = codes.reshape(rows, grid, columns, grid).transpose(0, 2, 1, 3)  # [rows, columns, g, g]
    present = np.stack([(cells == code).any((2, 3)) for code in _CODES], -1)  # [rows, columns, 6]
    words = []
    for row in range(rows):
        for column in range(columns):
            found = np.flatnonzero(present[row, column])
            if len(found) > 1:
                raise ValueError(
                    f"the cell at ({column * grid}, {row * grid}) holds colours {[_NAMES[c] for c in found]}"
                )
            if not len(found):
                words.append(cell_word(None, None))
                continue
            colour = int(found[0])
            words.append(cell_word(_NAMES[colour], _kind(cells[row, column] == _CODES[colour])))
    return words


def _spoken(word: str) -> str:
    """``"<c:red_circle>"`` -> ``"red circle"``, ``"<c:empty>"`` -> ``"empty"``."""
    return word[3:-1].replace("_", " ")


def cell_listing(sample: Mapping[str, Any], grid: int) -> dict[str, Any]:
    """A ``cells`` alignment sample from the first image of ``sample``: every cell named, row by row.

    The answer (``"red circle, empty, blue star; empty, ..."``, rows separated by ``;``) supervises
    every visual token, where a question's answer supervises one or two tokens: alignment data, as
    the captions of Qwen3-VL's stage S0. It is a training task only (no verifier scores it).
    """
    image = sample_images(sample)[0]
    words = cell_words(image, grid)
    columns = image.width // grid
    rows = [", ".join(_spoken(w) for w in words[i : i + columns]) for i in range(0, len(words), columns)]
    return {
        "id": f"{sample['id']}-cells",
        "task": "cells",
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": CELLS_PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": "; ".join(rows) + "."}]},
        ],
    }


class CellListing:
    """Map-style dataset of :func:`cell_listing` samples made from another dataset's images."""

    def __init__(self, images: Any, grid: int) -> None:
        self.images, self.grid = images, grid

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return cell_listing(self.images[index], self.grid)


def sample_images(sample: Mapping[str, Any]) -> list[PIL.Image.Image]:
    """The images of a sample's user turns, in order.

    Raises:
        ValueError: A video item (the text view covers images only), with the sample's id.
    """
    out = []
    for message in sample["messages"]:
        if message["role"] != "user" or not isinstance(message["content"], list):
            continue
        for item in message["content"]:
            if item["type"] == "video":
                raise ValueError(f"sample {sample.get('id')!r} holds a video: the text view covers images only")
            if item["type"] == "image":
                out.append(item["image"])
    return out


def _replace(
    input_ids: torch.Tensor, sample: Mapping[str, Any], tokenizer: Any, image_token_id: int, grid: int
) -> torch.Tensor:
    """``[L]`` ids with each image's placeholder run replaced by its cells' tokens."""
    cells = [tokenizer.convert_tokens_to_ids(w) for image in sample_images(sample) for w in cell_words(image, grid)]
    where = (input_ids == image_token_id).nonzero().flatten()
    if len(where) != len(cells):
        raise ValueError(
            f"sample {sample.get('id')!r}: {len(where)} image placeholders but {len(cells)} cells; the grid "
            f"({grid} px) must equal patch x merge, and the images must not be resized (max_pixels)"
        )
    out = input_ids.clone()
    out[where] = torch.tensor(cells, dtype=out.dtype)
    return out


def to_text_view(rendered: RenderedSample, sample: Mapping[str, Any], processor: Any, grid: int) -> RenderedSample:
    """``rendered`` with its images as cell tokens and no pixels (labels unchanged: only answers are supervised).

    Raises:
        ValueError: Placeholders and cells that do not pair up one to one (see :func:`cell_words`).
    """
    ids = _replace(rendered.input_ids, sample, processor.tokenizer, processor.image_token_id, grid)
    return dataclasses.replace(
        rendered,
        input_ids=ids,
        mm_token_type_ids=torch.zeros_like(ids),
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
    )


class TextView:
    """A ``SampleRenderer`` whose samples come out in the text view (a renderer for ``PackedStream``).

    Args:
        renderer: Renders the samples (its processor's tokenizer must hold the cell tokens).
        grid: Cell side of the scenes.
    """

    def __init__(self, renderer: SampleRenderer, grid: int) -> None:
        self.renderer, self.grid = renderer, grid

    def __call__(self, sample: Any) -> RenderedSample | None:
        """The text view of one sample; None when the renderer dropped it."""
        rendered = self.renderer(sample)
        return None if rendered is None else to_text_view(rendered, sample, self.renderer.processor, self.grid)


def text_prompt_inputs(processor: Any, sample: Mapping[str, Any], grid: int, thinking: bool = False) -> dict[str, Any]:
    """``prompt_inputs`` of a sample in the text view (``input_ids [1, P]``, no pixels)."""
    inputs = prompt_inputs(processor, sample, thinking=thinking)
    ids = _replace(inputs["input_ids"][0], sample, processor.tokenizer, processor.image_token_id, grid)[None]
    return {"input_ids": ids, "mm_token_type_ids": torch.zeros_like(ids)}
