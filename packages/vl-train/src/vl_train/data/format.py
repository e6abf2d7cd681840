"""The multimodal sample format of vl-train: validation, JSONL and Hugging Face ``datasets`` loading, media decoding.

Implements the data side of the Qwen3-VL training recipe (Qwen3-VL technical report, arXiv
2511.21631, section 3; REFERENCE.md section 4): every stage reads conversations that interleave
text with images and videos.

A sample is a dict::

    {
        "id": str,
        "task": str,
        "messages": [
            {
                "role": "system" | "user" | "assistant",
                "content": str
                | [
                    {"type": "text", "text": str},
                    {"type": "image", "image": PIL.Image | path | bytes},
                    {"type": "video", "video": [frames] | path, "fps": float},
                ],
            }
        ],
        "reasoning": str,  # optional: the final answer's chain of thought (thinking format)
        "answer": ...,
    }  # optional: the verifiable answer (rewards, evaluation)

In a JSONL file (one sample per line) a media reference is a path relative to the file, or a
``data:<mime>;base64,<data>`` string; video frames are lists of such references. Loaded samples
carry ``"_source"`` (``"file.jsonl:LINE"``) so that errors can name where a bad sample lives.

Every malformed line (bytes that are not UTF-8, text that is not JSON, a JSON value that is not an
object, nesting deeper than ``MAX_DEPTH``, a bad data URL, a malformed sample) is a one-line
:class:`DataError` naming ``file:line`` and the field; :class:`JsonlDataset` raises it
(``policy="fail"``) or skips the line and counts it in :class:`DataStats` (``policy="skip"``).

Notation: "media" = images and video frames; "location" = where a sample came from.
"""

from __future__ import annotations

import importlib
import math
import os
import reprlib
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import PIL.Image

from vl_vision.processing import open_image

from ._jsonl import MAX_DEPTH, LineError, parse_line, resolve_media, write_jsonl
from .llava import from_llava, is_llava, marker_problem

__all__ = [
    "MAX_DEPTH",
    "ROLES",
    "BadInputPolicy",
    "DataError",
    "DataStats",
    "HFDataset",
    "JsonlDataset",
    "load_image",
    "load_video",
    "sample_location",
    "validate_sample",
    "write_jsonl",
]

ROLES = ("system", "user", "assistant")
"""Message roles a sample may use."""

BadInputPolicy = Literal["fail", "skip"]
"""What to do with a sample whose media is missing or corrupt: raise, or skip it and count."""

_REPR = reprlib.Repr()  # bounded reprs for error messages: a huge or deeply nested value stays short
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 2, 3, 4, 40, 40


def _short(value: Any) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class DataError(ValueError):
    """A bad sample; the message names the sample id and where it came from (``file:line``)."""

    def __init__(self, message: str, *, sample_id: str | None = None, location: str | None = None) -> None:
        message = " ".join(message.splitlines())  # one line per error, whatever a decoder said
        where = f" at {location}" if location else ""
        super().__init__(f"sample {_short(sample_id)}{where}: {message}")
        self.sample_id = sample_id
        self.location = location
        self.reason = message


@dataclass
class DataStats:
    """Counts of what the data pipeline kept, changed and dropped (nothing is dropped silently).

    Attributes:
        counts: Event name -> count, e.g. ``"rendered"``, ``"skipped_bad_media"``, ``"truncated"``,
            ``"dropped_overlong"``, ``"dropped_cut_media"``, ``"dropped_no_labels"``.
        examples: Event name -> up to ``max_examples`` messages naming the samples concerned.
        max_examples: How many example messages to keep per event.
    """

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, event: str, message: str | None = None) -> None:
        """Count one ``event``; keep ``message`` as an example while there are few."""
        self.counts[event] += 1
        if message is not None:
            kept = self.examples.setdefault(event, [])
            if len(kept) < self.max_examples and message not in kept:  # a cycling source repeats its samples
                kept.append(message)

    def __getitem__(self, event: str) -> int:
        return self.counts[event]

    def merge(self, other: DataStats) -> None:
        """Add another object's counts (e.g. from a data-loader worker) to these."""
        self.counts.update(other.counts)
        for event, messages in other.examples.items():
            kept = self.examples.setdefault(event, [])
            kept.extend(messages[: max(0, self.max_examples - len(kept))])

    def state_dict(self) -> dict[str, Any]:
        """Plain-data snapshot (checkpointable)."""
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot."""
        self.counts = Counter(state["counts"])
        self.examples = {k: list(v) for k, v in state["examples"].items()}

    def report(self) -> str:
        """A human-readable summary, one event per line with examples (empty string when nothing happened)."""
        lines = []
        for event in sorted(self.counts):
            lines.append(f"{event}: {self.counts[event]}")
            lines += [f"  - {m}" for m in self.examples.get(event, [])]
        return "\n".join(lines)


def sample_location(sample: Mapping[str, Any]) -> str | None:
    """Where a loaded sample came from (``"file.jsonl:LINE"``, ``"hf:NAME[INDEX]"``), if known."""
    value = sample.get("_source")
    return str(value) if value is not None else None


def _fail(sample: Mapping[str, Any], message: str) -> DataError:
    sid = sample.get("id") if isinstance(sample, Mapping) else None
    return DataError(message, sample_id=None if sid is None else str(sid), location=sample_location(sample))


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def validate_sample(sample: Any, *, prompt_only: bool = False) -> dict[str, Any]:
    """Check a sample's structure (not its media) and return it.

    Args:
        sample: A dict in the format of this module's docstring.
        prompt_only: The sample is a prompt (RL, evaluation): it needs a user turn instead of an
            assistant turn.

    Returns:
        The same dict.

    Raises:
        DataError: Missing or mistyped fields, unknown roles or content items, no assistant turn (no user
            turn for a prompt);
            the message names the sample id, its location and the offending message index.
    """
    if not isinstance(sample, dict):
        raise DataError(f"a sample must be a dict, got {type(sample).__name__}")
    if not isinstance(sample.get("id"), str):
        raise _fail(sample, f"'id' must be a string, got {type(sample.get('id')).__name__}")
    if not isinstance(sample.get("task", ""), str):
        raise _fail(sample, "'task' must be a string")
    if "reasoning" in sample and sample["reasoning"] is not None and not isinstance(sample["reasoning"], str):
        raise _fail(sample, f"'reasoning' must be a string, got {type(sample['reasoning']).__name__}")
    messages = sample.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _fail(sample, "'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise _fail(sample, f"message {i} has role {_short(role)}; expected one of {ROLES}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _fail(sample, f"message {i} content must be a string or a list, got {type(content).__name__}")
        for j, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind not in ("text", "image", "video") or kind not in item:
                raise _fail(sample, f"message {i} item {j} must be a text, image or video item, got {_short(item)}")
            if kind == "text" and not isinstance(item["text"], str):
                raise _fail(sample, f"message {i} item {j}: 'text' must be a string")
            if kind != "text" and message["role"] != "user":
                raise _fail(sample, f"message {i}: only user messages may hold images or videos")
            if kind == "video" and item.get("fps") is not None and not _positive_number(item["fps"]):
                raise _fail(
                    sample,
                    f"message {i} item {j}: 'fps' must be a positive finite number, got {_short(item['fps'])}",
                )
    if prompt_only:
        if not any(m["role"] == "user" for m in messages):
            raise _fail(sample, "no user message: nothing to prompt with")
    elif not any(m["role"] == "assistant" for m in messages):
        raise _fail(sample, "no assistant message: nothing to train on")
    marker = marker_problem(sample)
    if marker is not None:
        raise _fail(sample, marker)
    return sample


# ---------------------------------------------------------------------------- media


def load_image(source: Any, sample: Mapping[str, Any], what: str = "image") -> PIL.Image.Image:
    """Decode one image reference (PIL image, path, bytes) of ``sample``.

    Raises:
        DataError: A missing file or undecodable data, naming the sample and its location.
    """
    if isinstance(source, PIL.Image.Image):
        return source
    if not isinstance(source, str | bytes | bytearray | os.PathLike):
        raise _fail(sample, f"{what}: unsupported reference of type {type(source).__name__}")
    try:
        return open_image(bytes(source) if isinstance(source, bytearray) else source, name=what)
    except (OSError, ValueError) as exc:
        raise _fail(sample, f"{what} is missing or corrupt: {exc}") from exc


def load_video(source: Any, sample: Mapping[str, Any], what: str = "video") -> Any:
    """Decode a video given as a list of frame references; a path or an array passes through unchanged.

    Raises:
        DataError: A missing or corrupt frame, or a missing video file.
    """
    if isinstance(source, list | tuple):
        if not source:
            raise _fail(sample, f"{what} has no frames")
        return [
            f if not isinstance(f, str | bytes | os.PathLike) else load_image(f, sample, f"{what} frame {k}")
            for k, f in enumerate(source)
        ]
    if isinstance(source, str | os.PathLike) and not Path(source).is_file():
        raise _fail(sample, f"{what} is missing: no such file {str(source)!r}")
    return source


# ---------------------------------------------------------------------------- JSONL


class JsonlDataset:
    """A JSONL file of samples, read lazily line by line (a streaming, re-iterable source).

    Args:
        path: The ``.jsonl`` file.
        validate: Check each sample's structure while reading.
        policy: What a malformed line does (not UTF-8, not a JSON object, nested deeper than
            ``MAX_DEPTH``, a bad data URL, or with ``validate`` a malformed sample): ``"fail"``
            raises its :class:`DataError`; ``"skip"`` leaves it out and counts it in ``stats``
            (``"skipped_bad_line"``, or ``"skipped_invalid"`` for a malformed sample).
        stats: Where skipped lines are counted (a new :class:`DataStats` when None); pass the
            renderer's to see every event of a pipeline in one place.

    Iterating yields sample dicts with media paths made absolute, base64 media decoded to bytes and
    ``"_source"`` set to ``"path:LINE"``. Blank lines are ignored.

    Raises:
        FileNotFoundError: The file does not exist (at construction).
        ValueError: An unknown ``policy``.
        DataError: With ``policy="fail"``, a malformed line: one line naming ``file:line``, the
            sample id when known, the field and the problem.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        validate: bool = True,
        policy: BadInputPolicy = "fail",
        stats: DataStats | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such JSONL file: {str(self.path)!r}")
        if policy not in ("fail", "skip"):
            raise ValueError(f"policy must be 'fail' or 'skip', got {policy!r}")
        self.validate = validate
        self.policy: BadInputPolicy = policy
        self.stats = stats if stats is not None else DataStats()

    def _line(self, raw: bytes, number: int) -> dict[str, Any] | None:
        location = f"{self.path}:{number}"
        sample: dict[str, Any] | None = None
        try:
            sample = parse_line(raw, first=number == 1)
            if sample is not None:
                if is_llava(sample):
                    try:
                        sample = from_llava(sample)
                    except ValueError as exc:
                        raise LineError(f"LLaVA-style sample: {exc}") from None
                sample["_source"] = location
                resolve_media(sample, self.path.parent)
        except LineError as exc:
            sid = sample.get("id") if sample is not None else None
            raise DataError(str(exc), sample_id=sid if isinstance(sid, str) else None, location=location) from None
        return sample

    def _bad(self, event: str, exc: DataError) -> None:
        if self.policy == "fail":
            raise exc
        self.stats.add(event, str(exc))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with self.path.open("rb") as handle:  # bytes: a line that is not UTF-8 is that line's error
            for number, raw in enumerate(handle, start=1):
                try:
                    sample = self._line(raw, number)
                except DataError as exc:
                    self._bad("skipped_bad_line", exc)
                    continue
                if sample is None:
                    continue
                if self.validate:
                    try:
                        validate_sample(sample)
                    except DataError as exc:
                        self._bad("skipped_invalid", exc)
                        continue
                yield sample


class HFDataset:
    """Samples from a Hugging Face ``datasets`` ``Dataset`` / ``IterableDataset`` (or a dataset name).

    Args:
        dataset: A ``datasets`` dataset object, or arguments for ``datasets.load_dataset`` given as
            ``name`` (plus ``load_kwargs``).
        name: What to call the source in locations (``"hf:NAME[INDEX]"``).
        validate: Check each sample's structure while reading.
        **load_kwargs: Passed to ``datasets.load_dataset`` when ``dataset`` is a string.

    Raises:
        ImportError: ``datasets`` is not installed (``pip install vl-train[datasets]``).
    """

    def __init__(self, dataset: Any, *, name: str | None = None, validate: bool = True, **load_kwargs: Any) -> None:
        if isinstance(dataset, str):
            try:
                datasets = importlib.import_module("datasets")
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise ImportError("HFDataset needs the 'datasets' package: pip install 'vl-train[datasets]'") from exc
            name = name or dataset
            dataset = datasets.load_dataset(dataset, **load_kwargs)
        self.dataset = dataset
        self.name = name or type(dataset).__name__
        self.validate = validate

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index, row in enumerate(self.dataset):
            sample = from_llava(row) if is_llava(row) else dict(row)
            sample["_source"] = f"hf:{self.name}[{index}]"
            yield validate_sample(sample) if self.validate else sample
