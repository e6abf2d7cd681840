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

Notation: "media" = images and video frames; "location" = where a sample came from.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image

from vl_vision.processing import open_image

__all__ = [
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

_DATA_URI = "data:"


class DataError(ValueError):
    """A bad sample; the message names the sample id and where it came from (``file:line``)."""

    def __init__(self, message: str, *, sample_id: str | None = None, location: str | None = None) -> None:
        where = f" at {location}" if location else ""
        super().__init__(f"sample {sample_id!r}{where}: {message}")
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
            if len(kept) < self.max_examples:
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
            turn for a prompt); the message names the sample id, its location and the offending message index.
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
            raise _fail(sample, f"message {i} has role {role!r}; expected one of {ROLES}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _fail(sample, f"message {i} content must be a string or a list, got {type(content).__name__}")
        for j, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind not in ("text", "image", "video") or kind not in item:
                raise _fail(sample, f"message {i} item {j} must be a text, image or video item, got {item!r:.80}")
            if kind == "text" and not isinstance(item["text"], str):
                raise _fail(sample, f"message {i} item {j}: 'text' must be a string")
            if kind != "text" and message["role"] != "user":
                raise _fail(sample, f"message {i}: only user messages may hold images or videos")
            if kind == "video" and item.get("fps") is not None and not float(item["fps"]) > 0:
                raise _fail(sample, f"message {i} item {j}: video fps must be > 0, got {item['fps']}")
    if prompt_only:
        if not any(m["role"] == "user" for m in messages):
            raise _fail(sample, "no user message: nothing to prompt with")
    elif not any(m["role"] == "assistant" for m in messages):
        raise _fail(sample, "no assistant message: nothing to train on")
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


def _decode_ref(value: Any, base: Path) -> Any:
    """A JSONL media reference -> bytes (base64 data URI) or an absolute path."""
    if isinstance(value, str):
        if value.startswith(_DATA_URI):
            return base64.b64decode(value.split(",", 1)[1], validate=False)
        path = Path(value)
        return str(path if path.is_absolute() else base / path)
    return value


def _resolve_media(sample: dict[str, Any], base: Path) -> dict[str, Any]:
    for message in sample.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for item in content:
            if not isinstance(item, dict):
                continue
            if isinstance(item.get("image"), str):
                item["image"] = _decode_ref(item["image"], base)
            video = item.get("video")
            if isinstance(video, list):
                item["video"] = [_decode_ref(v, base) for v in video]
            elif isinstance(video, str):
                item["video"] = _decode_ref(video, base)
    return sample


class JsonlDataset:
    """A JSONL file of samples, read lazily line by line (a streaming, re-iterable source).

    Args:
        path: The ``.jsonl`` file.
        validate: Check each sample's structure while reading.

    Iterating yields sample dicts with media paths made absolute, base64 media decoded to bytes and
    ``"_source"`` set to ``"path:LINE"``. Blank lines are ignored.

    Raises:
        FileNotFoundError: The file does not exist (at construction).
        DataError: A line that is not JSON, or (``validate``) a malformed sample.
    """

    def __init__(self, path: str | os.PathLike[str], *, validate: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such JSONL file: {str(self.path)!r}")
        self.validate = validate

    def __iter__(self) -> Iterator[dict[str, Any]]:
        base = self.path.parent
        with self.path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                location = f"{self.path}:{number}"
                try:
                    sample = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"not valid JSON: {exc}", location=location) from exc
                if isinstance(sample, dict):
                    sample["_source"] = location
                    _resolve_media(sample, base)
                yield validate_sample(sample) if self.validate else sample


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
            sample = dict(row)
            sample["_source"] = f"hf:{self.name}[{index}]"
            yield validate_sample(sample) if self.validate else sample


def _encode_ref(value: Any, folder: Path, stem: str, inline: bool) -> str:
    """The JSONL reference of one medium: in-memory media are written into ``folder`` (or inlined)."""
    if not isinstance(value, str | bytes | bytearray | PIL.Image.Image | os.PathLike):
        value = PIL.Image.fromarray(np.asarray(value))  # a frame given as an array
    if isinstance(value, PIL.Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        value = buffer.getvalue()
    if isinstance(value, bytes | bytearray):
        if inline:
            return "data:image/png;base64," + base64.b64encode(bytes(value)).decode("ascii")
        name = f"{stem}.png"
        (folder / name).write_bytes(bytes(value))
        return f"{folder.name}/{name}"
    if isinstance(value, str) and value.startswith(_DATA_URI):
        return value
    # a file stays where it is: referenced by its absolute path (a reader resolves relative paths against the
    # JSONL file's folder, not against the working directory this path was relative to)
    return str(Path(value).resolve())


def write_jsonl(
    samples: Iterable[Mapping[str, Any]], path: str | os.PathLike[str], *, inline_media: bool = False
) -> Path:
    """Write samples as JSONL; in-memory images become PNG files next to it (or base64 with ``inline_media``).

    Args:
        samples: Samples in this module's format (PIL images, bytes or path strings as media).
        path: Output ``.jsonl`` file; media files go to ``<stem>_media/`` beside it.
        inline_media: Embed media as base64 data URIs instead of writing files.

    Returns:
        The path written.
    """
    out = Path(path)
    media = out.parent / f"{out.stem}_media"
    if not inline_media:
        media.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for n, sample in enumerate(samples):
            row = {k: v for k, v in sample.items() if k != "_source"}
            messages = []
            for i, message in enumerate(row["messages"]):
                content = message["content"]
                if isinstance(content, list):
                    items = []
                    for j, item in enumerate(content):
                        item = dict(item)
                        stem = f"{n}_{i}_{j}"
                        if "image" in item:
                            item["image"] = _encode_ref(item["image"], media, stem, inline_media)
                        if isinstance(item.get("video"), list):
                            item["video"] = [
                                _encode_ref(f, media, f"{stem}_{k}", inline_media) for k, f in enumerate(item["video"])
                            ]
                        elif isinstance(item.get("video"), str | os.PathLike):
                            item["video"] = _encode_ref(item["video"], media, stem, inline_media)
                        items.append(item)
                    content = items
                messages.append({**message, "content": content})
            row["messages"] = messages
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out
