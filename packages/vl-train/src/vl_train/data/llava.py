"""LLaVA-style samples: converted to the suite's format, and ``<image>`` markers never trained as text.

Many public datasets (LLaVA-Instruct, ShareGPT4V, ...) store a sample as
``{"id", "image": "x.jpg" | ["a.jpg", ...], "video": ..., "conversations": [{"from": "human" | "gpt" |
"system", "value": "<image>\\nWhat is ..."}]}``: the media sit at the top level and an ``<image>`` (``<video>``)
marker in the text says where each goes. :func:`from_llava` turns such a sample into ours (image / video
items where the markers were, roles ``user`` / ``assistant`` / ``system``). In the suite's own format media
are content items, so a marker left in a text would be trained as literal text: :func:`marker_problem` finds
it, and validation rejects the sample naming the message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["MARKERS", "from_llava", "is_llava", "marker_problem"]

MARKERS = {"<image>": "image", "<video>": "video"}
"""LLaVA's media markers and the item type each stands for."""

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_MARKER = re.compile("|".join(re.escape(m) for m in MARKERS))


def is_llava(sample: Mapping[str, Any]) -> bool:
    """Whether ``sample`` is in LLaVA's layout (``conversations`` and no ``messages``)."""
    return isinstance(sample, Mapping) and "conversations" in sample and "messages" not in sample


def _media(sample: Mapping[str, Any], key: str) -> list[Any]:
    """The sample's images (a path or a list of them) or videos (a path, a list of frame paths for one video,
    or a list of such videos)."""
    value = sample.get(key, sample.get(f"{key}s"))
    if value is None:
        return []
    if not isinstance(value, list):
        return [value]
    if key == "video" and value and not isinstance(value[0], list):
        return [value]  # one video given as its frames
    return list(value)


def from_llava(sample: Mapping[str, Any]) -> dict[str, Any]:
    """The suite's form of a LLaVA-style sample (see the module docstring); other keys are kept.

    Raises:
        ValueError: An unknown role, a turn that is not ``{"from", "value"}``, or markers that do not match
            the media given (counts named).
    """
    media = {kind: _media(sample, kind) for kind in MARKERS.values()}
    used = {kind: 0 for kind in media}
    messages = []
    for i, turn in enumerate(sample.get("conversations") or []):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise ValueError(f"conversations[{i}] must be an object with a string 'value', got {turn!r:.80}")
        role = _ROLES.get(str(turn.get("from")))
        if role is None:
            raise ValueError(f"conversations[{i}] has role {turn.get('from')!r}; expected one of {sorted(_ROLES)}")
        content: list[dict[str, Any]] = []
        at = 0
        text = turn["value"]
        for match in _MARKER.finditer(text):
            kind = MARKERS[match.group()]
            if used[kind] >= len(media[kind]):
                raise ValueError(
                    f"conversations[{i}] holds more {match.group()} markers than the {len(media[kind])} "
                    f"{kind}(s) the sample gives"
                )
            before = text[at : match.start()].strip("\n")
            if before:
                content.append({"type": "text", "text": before})
            content.append({"type": kind, kind: media[kind][used[kind]]})
            used[kind] += 1
            at = match.end()
        rest = text[at:].strip("\n") if content else text
        if rest or not content:
            content.append({"type": "text", "text": rest})
        messages.append(
            {"role": role, "content": content if len(content) > 1 or content[0]["type"] != "text" else rest}
        )
    unused = {kind: len(items) - used[kind] for kind, items in media.items() if len(items) > used[kind]}
    if unused:
        raise ValueError(f"the sample gives {unused} more media than its conversations have markers for")
    out = {k: v for k, v in sample.items() if k not in ("conversations", "image", "images", "video", "videos")}
    out["messages"] = messages
    return out


def marker_problem(sample: Mapping[str, Any]) -> str | None:
    """Where a text of a suite-format sample holds a LLaVA marker (it would be trained as text), or ``None``."""
    for i, message in enumerate(sample.get("messages") or []):
        content = message.get("content") if isinstance(message, Mapping) else None
        texts = (
            [content]
            if isinstance(content, str)
            else [
                item.get("text") for item in content or [] if isinstance(item, Mapping) and item.get("type") == "text"
            ]
        )
        for text in texts:
            found = _MARKER.search(text) if isinstance(text, str) else None
            if found:
                return (
                    f"message {i} text holds the LLaVA marker {found.group()!r}, which would be trained as text: give "
                    f"the {MARKERS[found.group()]} as a {{'type': '{MARKERS[found.group()]}'}} item where the marker is "
                    "(or use LLaVA's layout, 'conversations' with top-level media, which is converted)"
                )
    return None
