"""The embedded default dataset: procedurally generated, seeded multimodal samples with verifiable answers.

Implements the synthetic stand-in for Qwen3-VL's data mixture (Qwen3-VL technical report, arXiv
2511.21631, sections 3-4; REFERENCE.md section 4): images of varied sizes with coloured shapes, short
videos, multi-image and text-only samples, each with an answer a program can check, so that the same
samples serve supervised training (vl-train) and rewards (vl-rl). Everything is generated on the fly
from ``(seed, split, index)``: nothing is downloaded, and the same arguments give the same bytes.

Sample format (the suite's multimodal sample, consumed by ``vl_train.data.render``)::

    {
        "id": "synthetic-train-0-17",
        "task": "count",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": PIL.Image.Image},
                    {"type": "text", "text": "How many stars ...? Answer with a number."},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
        ],
        "answer": 3,
        "answer_type": "count",
        "reasoning": "The shapes from left to right: ...",
    }

The ``"reasoning"`` key is present on a ``thinking`` fraction of samples, ``"options"`` (the allowed
answers) on ``"choice"`` samples only. A video item is ``{"type": "video", "video": [PIL frames],
"fps": float}``; multi-image samples hold several image items; text-only samples hold none. The thinking
format (``<think>reasoning</think>``) is rendered by the data pipeline from ``reasoning``.

=========== ============ =================================== ========================================
task        answer_type  answer                              what :func:`verify` checks
=========== ============ =================================== ========================================
caption     caption      labels, left to right               same multiset of "<colour> <shape>"
count       count        int                                 the final answer's only number
colour      choice       colour name                         exactly one option named: the right one
spatial     choice       "yes" / "no"                        idem
compare     choice       "first" / "second"                  idem
grounding   boxes        [[x1, y1, x2, y2], ...] in 0-1000   one-to-one IoU >= 0.5; extras cost
video_*     timestamps   [[label, seconds], ...]             same label, within 0.5 s; extras cost
text_math   number       int                                 the final answer's only number
=========== ============ =================================== ========================================

Only the final answer counts: text up to the last ``</think>`` is ignored, an unclosed ``<think>``
scores 0, and a ``\\boxed{...}`` (or ``<|begin_of_box|>...<|end_of_box|>``) answer is preferred.

Splits: ``"train"`` and ``"heldout"`` draw from disjoint random streams, and a sample is kept only when
the hash of its images and prompt falls on its split's side, so no sample of one split can occur in
the other (redrawn otherwise: about two draws per sample).

Notation: ``t = k / fps`` seconds for frame ``k``; boxes ``[x1, y1, x2, y2]`` in 0-1000 coordinates.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from ._shapes import COLOURS, KINDS
from ._tasks import TASKS, Retry, TaskContext

__all__ = ["TASK_NAMES", "SyntheticDataset", "content_hash", "final_answer", "verify"]

TASK_NAMES: tuple[str, ...] = tuple(TASKS)
"""All task names, in the order the dataset cycles through them."""

Split = Literal["train", "heldout"]
_SPLITS = {"train": 0, "heldout": 1}
_MAX_DRAWS = 200


def content_hash(sample: dict[str, Any]) -> str:
    """Hex digest of a sample's user content: every image and video frame's pixels and every text."""
    h = hashlib.blake2b(digest_size=16)
    for message in sample["messages"]:
        if message["role"] != "user":
            continue
        for item in message["content"]:
            frames = [item["image"]] if item["type"] == "image" else item.get("video", [])
            for frame in frames:
                h.update(f"{frame.size}".encode())
                h.update(frame.tobytes())
            if item["type"] == "text":
                h.update(item["text"].encode())
    return h.hexdigest()


class SyntheticDataset:
    """Seeded synthetic multimodal samples with random access (``ds[i]``), ``len`` and iteration.

    Args:
        split: ``"train"`` or ``"heldout"`` (disjoint).
        size: Number of samples ``len(ds)``.
        seed: Base seed; ``(seed, split, index)`` fixes a sample.
        tasks: Task names to cycle through (sample ``i`` has task ``tasks[i % len(tasks)]``); None for all.
        image_size_range: Smallest and largest image side in pixels (each side drawn independently).
        video_frames: Smallest and largest number of frames per video.
        fps: Video frames per second (timestamps are ``frame / fps``).
        thinking: Fraction of samples that carry a ``reasoning`` field (0 none, 1 all).
        grid: Cell side in pixels, or 0 (the default) to place shapes anywhere. With a grid, image sides
            are rounded down to multiples of it and every still shape lies inside one cell, with a side of
            5/8 of the cell up to the cell less 2 pixels (the moving shape of ``video_move`` still moves
            freely). Set it to the model's pixels per visual token (``patch_size * spatial_merge_size``,
            with image areas within the processor's ``max_pixels`` so that nothing is resized) and each
            shape is exactly one visual token. A small model trained from scratch learns shape kinds
            far faster that way (measured in ``examples/demo/README.md``).

    Raises:
        ValueError: Unknown split or task, or out-of-range sizes, frame counts, fps, thinking fraction or
            grid.
    """

    def __init__(
        self,
        split: Split = "train",
        size: int = 1000,
        seed: int = 0,
        tasks: Sequence[str] | None = None,
        image_size_range: tuple[int, int] = (64, 256),
        video_frames: tuple[int, int] = (4, 8),
        fps: float = 2.0,
        thinking: float = 0.5,
        grid: int = 0,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        names = list(TASK_NAMES if tasks is None else tasks)
        unknown = [t for t in names if t not in TASKS]
        if unknown or not names:
            raise ValueError(f"unknown tasks {unknown} (or none given); expected a subset of {TASK_NAMES}")
        lo, hi = image_size_range
        if not 48 <= lo <= hi:
            raise ValueError(f"image_size_range must satisfy 48 <= low <= high, got {image_size_range}")
        flo, fhi = video_frames
        if not 2 <= flo <= fhi:
            raise ValueError(f"video_frames must satisfy 2 <= low <= high, got {video_frames}")
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if not 0.0 <= thinking <= 1.0:
            raise ValueError(f"thinking must be in [0, 1], got {thinking}")
        if grid != 0 and not 16 <= grid <= lo:
            raise ValueError(
                f"grid must be 0 (free placement) or between 16 and the smallest image side {lo}, got {grid}"
            )
        self.split, self.size, self.seed, self.tasks = split, size, seed, names
        self.thinking, self.grid = thinking, grid
        self.context = TaskContext((lo, hi), (flo, fhi), float(fps), grid)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self.size):
            yield self[i]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size} samples")
        task = self.tasks[index % len(self.tasks)]
        split_id = _SPLITS[self.split]
        for draw in range(_MAX_DRAWS):
            rng = np.random.default_rng([self.seed, split_id, index, draw])
            try:
                out = TASKS[task](rng, self.context)
            except Retry:
                continue
            sample: dict[str, Any] = {
                "id": f"synthetic-{self.split}-{self.seed}-{index}",
                "task": task,
                "messages": [
                    {"role": "user", "content": out.content},
                    {"role": "assistant", "content": [{"type": "text", "text": out.answer_text}]},
                ],
                "answer": out.answer,
                "answer_type": out.answer_type,
            }
            if int(content_hash(sample)[:2], 16) % 2 != split_id:
                continue  # this content belongs to the other split
            if out.options is not None:
                sample["options"] = out.options
            if np.random.default_rng([self.seed, split_id, index, 1 << 32]).random() < self.thinking:
                sample["reasoning"] = out.reasoning
            return sample
        raise RuntimeError(f"task {task!r} found no valid sample for index {index} in {_MAX_DRAWS} draws")


_BOXED = ("\\boxed{", "<|begin_of_box|>")


def final_answer(response: str) -> str | None:
    """The part of a response that is graded: after the last ``</think>``, inside the last box if any.

    Returns:
        The stripped final answer, or None when a ``<think>`` block is never closed.
    """
    if "</think>" in response:
        response = response.rsplit("</think>", 1)[1]
    elif "<think>" in response:
        return None
    start = max(response.rfind(marker) + len(marker) if marker in response else -1 for marker in _BOXED)
    if start >= 0:
        if response[:start].endswith("<|begin_of_box|>"):
            return response[start:].split("<|end_of_box|>", 1)[0].strip()
        depth = 1  # \boxed{...} may hold JSON braces: find its matching brace
        for i in range(start, len(response)):
            depth += {"{": 1, "}": -1}.get(response[i], 0)
            if depth == 0:
                return response[start:i].strip()
        return response[start:].strip()
    return response.strip()


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
_WORD_NUMBER = re.compile(r"\b(" + "|".join(_WORDS) + r")\b")
_KIND = "|".join(KINDS)
_COLOUR = "|".join(COLOURS)
_MENTION = re.compile(rf"(?:\b(\d+|{'|'.join(_WORDS)})\s+)?\b({_COLOUR})\s+({_KIND})s?\b")
_BOX = re.compile(
    r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]"
)
_LABEL = re.compile(rf"\b({_COLOUR})\s+({_KIND})")
_SECONDS = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:s\b|sec|second)")


def _numbers(text: str) -> set[float]:
    values = {float(v) for v in _NUMBER.findall(text)}
    return values | {float(_WORDS.index(w)) for w in _WORD_NUMBER.findall(text)}


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 and a[2] > a[0] and a[3] > a[1] else 0.0


def _match_score(expected: list[Any], predicted: list[Any], ok: Any) -> float:
    """Greedy one-to-one matching; matches / max(#expected, #predicted), so extra guesses cost reward."""
    if not expected and not predicted:
        return 1.0
    free = list(range(len(predicted)))
    matched = 0
    for e in expected:
        hit = next((j for j in free if ok(e, predicted[j])), None)
        if hit is not None:
            free.remove(hit)
            matched += 1
    return matched / max(len(expected), len(predicted))


def _timestamps(text: str, n_expected: int) -> list[tuple[str, float]]:
    labels = list(_LABEL.finditer(text))
    pairs = []
    for m, nxt in zip(labels, [*labels[1:], None]):
        segment = text[m.end() : nxt.start() if nxt else len(text)]
        number = _SECONDS.search(segment) or _NUMBER.search(segment)  # prefer a number marked as seconds
        if number:
            pairs.append(
                (f"{m.group(1)} {m.group(2)}", float(number.group(1) if number.re is _SECONDS else number.group()))
            )
    if not pairs and n_expected == 1:  # "at 1.5 seconds" answers a one-shape question without repeating it
        times = {float(v) for v in _SECONDS.findall(text)}
        pairs = [("", t) for t in times]
    return pairs


def verify(sample: dict[str, Any], response: str) -> float:
    """Reference reward of ``response`` for ``sample``: 1.0 right, 0.0 wrong, partial for boxes/timestamps.

    Args:
        sample: A sample of :class:`SyntheticDataset` (needs ``answer`` and ``answer_type``).
        response: The model's text, possibly with a ``<think>...</think>`` block.

    Returns:
        A score in [0, 1].

    Raises:
        ValueError: Unknown ``answer_type``.
    """
    kind, answer = sample["answer_type"], sample["answer"]
    text = final_answer(response)
    if text is None:
        return 0.0
    low = text.lower()
    if kind in ("count", "number"):
        values = _numbers(low)  # several distinct numbers = a hedge, never a final answer
        return float(len(values) == 1 and math.isclose(values.pop(), float(answer), abs_tol=1e-6))
    if kind == "choice":
        words = set(re.findall(r"[a-z]+", low))
        named = {o for o in sample["options"] if o in words}
        return float(named == {answer})
    if kind == "caption":
        seen: Counter[str] = Counter()
        for qty, col, shp in _MENTION.findall(low):
            n = 1 if not qty else (int(qty) if qty.isdigit() else _WORDS.index(qty))
            seen[f"{col} {shp}"] += n
        return float(seen == Counter(answer))
    if kind == "boxes":
        boxes = [[float(v) for v in m] for m in _BOX.findall(low)]
        return _match_score(answer, boxes, lambda e, p: _iou(e, p) >= 0.5)
    if kind == "timestamps":
        pairs = _timestamps(low, len(answer))
        ok = lambda e, p: p[0] in ("", e[0]) and abs(p[1] - e[1]) <= 0.5
        return _match_score(answer, pairs, ok)
    if kind == "text":
        norm = lambda s: " ".join(re.findall(r"[a-z0-9]+", s.lower()))
        return float(norm(text) == norm(str(answer)))
    raise ValueError(f"unknown answer_type {kind!r}")
