"""Answer extraction from model responses (GLM-4.5V / Qwen3-VL RL answer formats, REFERENCE.md section 5).

Markers, searched only in the answer region (the text after ``</think>`` when a think block exists):

- ``\\boxed{...}`` / ``\\fbox{...}`` with nested braces (``\\{`` and ``\\}`` are literal braces),
- ``<|begin_of_box|>...<|end_of_box|>`` (GLM-4.5V),
- ``<answer>...</answer>``,
- the last number of the region, only when ``fallback_last_number=True``.

Several boxes: a response that boxes two *different* answers is hedging, so by default
(``on_conflict="refuse"``) extraction returns ``None`` and the sample earns nothing; repeating the
same answer in several boxes is accepted. ``on_conflict="last"`` / ``"first"`` pick one instead.

An unclosed think block (a response truncated while thinking) has no answer region: ``None``.
Answers written inside the think block never count.
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = ["answer_region", "answer_text", "extract_answer", "find_boxed", "last_number", "normalize_answer"]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_BOX_CMD = re.compile(r"\\(?:boxed|fbox)\b")
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
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
            i += 2
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _tag_contents(text: str, open_tag: str, close_tag: str) -> list[tuple[int, str]]:
    """``(start, content)`` of each ``open...close`` pair, left to right, in linear time."""
    out: list[tuple[int, str]] = []
    pos = 0
    while True:
        start = text.find(open_tag, pos)
        if start < 0:
            return out
        end = text.find(close_tag, start + len(open_tag))
        if end < 0:  # no later close exists for any later open either
            return out
        out.append((start, text[start + len(open_tag) : end].strip()))
        pos = end + len(close_tag)


def find_boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed``/``\\fbox`` and ``<|begin_of_box|>`` box in order of appearance.

    Unclosed boxes are skipped. ``\\boxed 5`` (no braces) yields the next whitespace-free token.

    Args:
        text: Text to search.

    Returns:
        The stripped box contents.
    """
    found: list[tuple[int, str]] = []
    pairs = _brace_pairs(text) if "{" in text else {}
    for m in _BOX_CMD.finditer(text):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            end = pairs.get(i, -1)
            if end >= 0:
                found.append((m.start(), text[i + 1 : end].strip()))
        else:
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                found.append((m.start(), token.group(0).strip()))
    found.extend(_tag_contents(text, "<|begin_of_box|>", "<|end_of_box|>"))
    found.sort(key=lambda item: item[0])
    return [content for _, content in found]


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
    if len({normalize_answer(c) for c in candidates}) > 1:
        if on_conflict == "refuse":
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
    tagged = [content for _, content in _tag_contents(region, "<answer>", "</answer>")]
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
