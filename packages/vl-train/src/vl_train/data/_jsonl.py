"""The JSONL side of the sample format: one line -> one sample dict (every way a line can be malformed
named, for ``JsonlDataset``), and :func:`write_jsonl`.

A line must be UTF-8 text holding one JSON object nested at most ``MAX_DEPTH`` deep; its media
references (``messages[i].content[j].image`` / ``.video``) must be paths or base64 data URLs
(``data:<mime>;base64,<data>``). Anything else raises :class:`LineError`, whose message names the
field and the problem on one line; ``JsonlDataset`` adds ``file:line`` and applies its policy.

Notation: a "field" is a path into the sample such as ``messages[0].content[1].video[3]``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

__all__ = ["MAX_DEPTH", "LineError", "parse_line", "resolve_media", "write_jsonl"]

MAX_DEPTH = 32
"""Deepest nesting of lists and objects a JSONL sample may have (the format itself needs 7)."""

_DATA_URI = "data:"


class LineError(ValueError):
    """A JSONL line that cannot become a sample; the message names the field and the problem."""


def _too_deep(value: Any, limit: int) -> bool:
    """Whether lists/objects nest deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_line(raw: bytes, *, first: bool = False) -> dict[str, Any] | None:
    """The JSON object of one line (``None`` for a blank line).

    Args:
        raw: The line's bytes (its newline may be included).
        first: The file's first line, which may start with a UTF-8 byte-order mark.

    Raises:
        LineError: Not UTF-8, not JSON, nested deeper than ``MAX_DEPTH``, or not a JSON object.
    """
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        raise LineError(f"line is not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}") from None
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except RecursionError:
        raise LineError(f"not valid JSON: nested deeper than the JSON parser allows (limit {MAX_DEPTH})") from None
    except ValueError as exc:  # JSONDecodeError, and integers beyond Python's digit limit
        raise LineError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise LineError(f"a line must hold one JSON object (a sample), got {type(value).__name__}: {text.strip():.60}")
    if _too_deep(value, MAX_DEPTH):
        raise LineError(f"the sample nests lists/objects deeper than {MAX_DEPTH} levels")
    return value


def _decode_ref(value: Any, base: Path, field: str) -> Any:
    """A media reference -> bytes (base64 data URL), an absolute path, or the value unchanged."""
    if not isinstance(value, str):
        return value
    if value.startswith(_DATA_URI):
        header, comma, payload = value.partition(",")
        if not comma:
            raise LineError(f"{field}: data URL has no ',' before its data: {value:.40}")
        if not header.endswith(";base64"):
            raise LineError(f"{field}: only base64 data URLs are supported ('data:<mime>;base64,...'), got {header!r}")
        try:
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise LineError(f"{field}: data URL is not valid base64 ({exc})") from None
    path = Path(value)
    return str(path if path.is_absolute() else base / path)


def resolve_media(sample: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make media paths absolute and decode data URLs, in place (malformed structure is left to validation).

    Raises:
        LineError: A data URL without a comma, not base64, or not of base64 type.
    """
    messages = sample.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for j, item in enumerate(content if isinstance(content, list) else []):
            if not isinstance(item, dict):
                continue
            field = f"messages[{i}].content[{j}]"
            if isinstance(item.get("image"), str):
                item["image"] = _decode_ref(item["image"], base, f"{field}.image")
            video = item.get("video")
            if isinstance(video, list):
                item["video"] = [_decode_ref(v, base, f"{field}.video[{k}]") for k, v in enumerate(video)]
            elif isinstance(video, str):
                item["video"] = _decode_ref(video, base, f"{field}.video")
    return sample


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
    # a file stays where it is, by its absolute path: a reader resolves relative paths against the JSONL
    # file's folder, not against the working directory this path was relative to
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
