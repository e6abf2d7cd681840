"""Answer extraction from model responses (GLM-4.5V / Qwen3-VL RL answer formats, REFERENCE.md section 5).

Markers, searched only in the answer region (the text after ``</think>`` when a think block exists):

- ``\\boxed{...}`` / ``\\fbox{...}`` with nested braces (``\\{`` and ``\\}`` are literal braces),
- ``<|begin_of_box|>...<|end_of_box|>`` (GLM-4.5V),
- ``<answer>...</answer>``,
- the last number of the region, only when ``fallback_last_number=True``.

Several boxes: a response that boxes two *different* answers is hedging, so by default
(``on_conflict="refuse"``) extraction returns ``None`` and the sample earns nothing; repeating the
same answer in several boxes is accepted. ``on_conflict="last"`` / ``"first"`` pick one instead.

Time is linear in the length of the response by construction (rewards run on untrusted text): every
marker is found by one forward scan, at most ``MAX_BOXES + 1`` boxes are read (a response with more
boxes than ``MAX_BOXES`` holds no single final answer and is refused whatever ``on_conflict`` says),
and a box's content is cut at ``MAX_BOX_CHARS`` characters (a cut content ends in ``TRUNCATED`` and
never equals a reference).

An unclosed think block (a response truncated while thinking) has no answer region: ``None``.
Answers written inside the think block never count.
"""

from __future__ import annotations

import re
from typing import Literal

from vl_rl.rewards._reasons import zero

__all__ = [
    "MAX_BOXES",
    "MAX_BOX_CHARS",
    "answer_region",
    "answer_text",
    "extract_answer",
    "find_boxed",
    "last_number",
    "normalize_answer",
]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
MAX_BOXES = 64
"""Most boxes a response may hold; more is refused (no single final answer)."""
MAX_BOX_CHARS = 10_000
"""Longest box content kept; a longer one is cut and marked with ``TRUNCATED``."""
TRUNCATED = "\u2026[truncated]"
_BOX_CMD = re.compile(r"\\(?:boxed|fbox)\b")
_BRACE = re.compile(r"\\[{}]|[{}]")
_TOKEN = re.compile(rf"[^\s$]{{1,{MAX_BOX_CHARS}}}")
_MARKERS = ("<|begin_of_box|>", "<answer>")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?%?|[-+]?\.\d+%?")


def answer_region(text: str) -> str | None:
    """The part of ``text`` an answer may come from.

    Args:
        text: The full response.

    Returns:
        The text after the last ``</think>`` when a think block exists (also when ``<think>`` was
        part of the prompt and only ``</think>`` appears), the whole text when there is no think tag,
        and ``None`` when a think block is still open (truncated while thinking).
    """
    if THINK_CLOSE in text:
        region = text.rsplit(THINK_CLOSE, 1)[1]
        return None if THINK_OPEN in region else region
    if THINK_OPEN in text:
        return None
    return text


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each ``{`` -> index of its closing ``}`` in one linear pass (escaped braces skipped)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE.finditer(text):
        brace = m.group(0)
        if brace == "{":
            stack.append(m.start())
        elif brace == "}" and stack:
            pairs[stack.pop()] = m.start()
    return pairs


def _clip(text: str, start: int, end: int) -> str:
    """``text[start:end]`` stripped, cut at ``MAX_BOX_CHARS`` (then ending in ``TRUNCATED``)."""
    if end - start > MAX_BOX_CHARS:
        return text[start : start + MAX_BOX_CHARS].strip() + TRUNCATED
    return text[start:end].strip()


def _tag_contents(text: str, open_tag: str, close_tag: str, limit: int | None = None) -> list[tuple[int, str]]:
    """``(start, content)`` of each ``open...close`` pair, left to right, in linear time (at most ``limit``)."""
    out: list[tuple[int, str]] = []
    pos = 0
    while limit is None or len(out) < limit:
        start = text.find(open_tag, pos)
        if start < 0:
            return out
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:  # no later close exists for any later open either
            return out
        out.append((start, _clip(text, start + len(open_tag), end)))
        pos = end + len(close_tag)
    return out


def find_boxed(text: str) -> list[str]:
    """Contents of the ``\\boxed``/``\\fbox`` and ``<|begin_of_box|>`` boxes in order of appearance.

    Unclosed boxes are skipped. ``\\boxed 5`` (no braces) yields the next whitespace-free token.
    At most ``MAX_BOXES + 1`` boxes are returned, each cut at ``MAX_BOX_CHARS`` characters (see the
    module docstring), so the time is linear in ``len(text)``.

    Args:
        text: Text to search.

    Returns:
        The stripped box contents.
    """
    limit = MAX_BOXES + 1
    found: list[tuple[int, str]] = []
    pairs = _brace_pairs(text) if "{" in text else {}
    for m in _BOX_CMD.finditer(text):
        if len(found) == limit:
            break
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            end = pairs.get(i, -1)
            if end >= 0:
                found.append((m.start(), _clip(text, i + 1, end)))
        else:
            token = _TOKEN.match(text, i)
            if token:
                cut = token.end() < len(text) and _TOKEN.match(text, token.end()) is not None
                found.append((m.start(), token.group(0).strip() + (TRUNCATED if cut else "")))
    found.extend(_tag_contents(text, "<|begin_of_box|>", "<|end_of_box|>", limit))
    found.sort(key=lambda item: item[0])
    return [content for _, content in found[:limit]]


def last_number(text: str) -> str | None:
    """The last number in ``text`` (``1,000``, ``-2.5``, ``3e8``, ``50%``), or ``None``."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """Canonical string form used to decide whether two extracted answers are the same."""
    answer = answer.strip().strip("$").strip()
    answer = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", answer)
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return re.sub(r"\s+", "", answer).rstrip(".").lower()


def _pick(candidates: list[str], on_conflict: str) -> str | None:
    candidates = [c for c in candidates if c]
    if not candidates:
        return None
    if len(candidates) > MAX_BOXES:
        zero("too_many_boxes")
        return None
    if len({normalize_answer(c) for c in candidates}) > 1:
        if on_conflict == "refuse":
            zero("conflicting_answers")
            return None
        return candidates[0] if on_conflict == "first" else candidates[-1]
    return candidates[-1]


def extract_answer(
    text: str,
    *,
    fallback_last_number: bool = False,
    on_conflict: Literal["refuse", "last", "first"] = "refuse",
) -> str | None:
    """Extracts the final answer of a response.

    Boxes win over ``<answer>`` tags (a box inside the tags is the same box); the last-number
    fallback is used only when asked and only when no marker exists.

    Args:
        text: The response.
        fallback_last_number: Use the last number of the answer region when no marker is found.
        on_conflict: What to do with several markers holding different answers (see module doc).

    Returns:
        The extracted answer string, or ``None`` (no answer, truncated thinking, or conflicting boxes).
    """
    if on_conflict not in ("refuse", "last", "first"):
        raise ValueError(f"on_conflict must be 'refuse', 'last' or 'first', got {on_conflict!r}")
    if not isinstance(text, str) or not text.strip():
        return None
    region = answer_region(text)
    if region is None:
        return None
    boxes = find_boxed(region)
    if boxes:
        return _pick(boxes, on_conflict)
    tagged = [content for _, content in _tag_contents(region, "<answer>", "</answer>", MAX_BOXES + 1)]
    if tagged:
        return _pick(tagged, on_conflict)
    if fallback_last_number:
        return last_number(region)
    return None


def answer_text(response: str, *, require_marker: bool = False) -> str | None:
    """The marked answer (box or ``<answer>`` tags), else (unless ``require_marker``) the answer region.

    A response with a marker that gave no answer (two different boxes, an unclosed box) gives
    ``None`` and never falls back to its free text, which would let a hedging or truncated response
    be graded on whatever else it wrote.
    """
    answer = extract_answer(response)
    if answer is not None or require_marker:
        return answer
    region = answer_region(response) if isinstance(response, str) else None
    if region is None or _BOX_CMD.search(region) or any(tag in region for tag in _MARKERS):
        return None
    return region
