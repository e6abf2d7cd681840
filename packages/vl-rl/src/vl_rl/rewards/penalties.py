"""Format, repetition, code-switching and DAPO soft-overlong penalties (REFERENCE.md section 5).

- Format (Qwen3-VL general RL "format errors"): with thinking required, exactly one
  ``<think>...</think>`` block, first in the response, followed by a non-empty answer.
- Repetition: share of repeated n-grams, ``1 - #distinct / #total`` over word n-grams (CJK
  characters count as words), as a penalty in [-1, 0].
- Code-switching (Qwen3-VL): letters of the response (think block included) written in a script
  other than the prompt's dominant script. Math and code are allowed: ``$...$``, ``\\[...\\]``,
  code spans and fences, LaTeX commands, and Latin/Greek/Cyrillic runs shorter than 3 letters
  (variables, units such as "cm") are ignored. The spans are found by one forward scan (linear
  time: an unclosed ``\\[`` is not searched for again at every later ``\\[``).
- DAPO soft overlong penalty (arXiv 2503.14476): with ``L = |y|``, ``Lmax`` and ``Lcache``:
  0 if ``L <= Lmax - Lcache``; ``((Lmax - Lcache) - L) / Lcache`` if ``L <= Lmax``; -1 beyond.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from vl_rl.rewards.extract import THINK_CLOSE, THINK_OPEN

__all__ = [
    "code_switching_penalty",
    "code_switching_reward",
    "dominant_script",
    "format_reward",
    "repetition_penalty",
    "repetition_reward",
    "script_of",
    "soft_overlong_penalty",
    "think_format_ok",
]

_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD = re.compile(rf"[^\W{_CJK}]+|[{_CJK}]|[^\w\s]")
# (opener, closer) in the order they are tried at one position (a "```" without a closing "```" may
# still open a `...` span); a LaTeX command without a closer is matched by _COMMAND instead.
_SPANS = (("```", "```"), ("`", "`"), ("$$", "$$"), ("$", "$"), ("\\[", "\\]"), ("\\(", "\\)"))
_SPAN_START = re.compile(r"[`$\\]")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_SCRIPT_RANGES = [
    ("cjk", 0x3400, 0x4DBF), ("cjk", 0x4E00, 0x9FFF), ("cjk", 0xF900, 0xFAFF), ("cjk", 0x3040, 0x30FF),
    ("hangul", 0xAC00, 0xD7AF), ("hangul", 0x1100, 0x11FF), ("cyrillic", 0x0400, 0x04FF),
    ("greek", 0x0370, 0x03FF), ("arabic", 0x0600, 0x06FF), ("hebrew", 0x0590, 0x05FF),
    ("devanagari", 0x0900, 0x097F), ("thai", 0x0E00, 0x0E7F), ("latin", 0x0041, 0x024F),
]  # fmt: skip
_SHORT_RUN_SCRIPTS = {"latin", "greek", "cyrillic"}


def think_format_ok(response: str, *, require_think: bool = True, think_in_prompt: bool = False) -> bool:
    """Whether the think tags are well formed.

    Args:
        response: The response.
        require_think: A think block is required; otherwise either none or one well-formed block.
        think_in_prompt: The chat template already opened ``<think>`` in the prompt, so the response
            must contain one ``</think>`` and no ``<think>``.

    Returns:
        ``True`` when well formed and a non-empty answer follows ``</think>``.
    """
    if not response or not response.strip():
        return False
    n_open, n_close = response.count(THINK_OPEN), response.count(THINK_CLOSE)
    if think_in_prompt:
        return n_open == 0 and n_close == 1 and bool(response.split(THINK_CLOSE)[1].strip())
    if n_open == 0 and n_close == 0:
        return not require_think
    if n_open != 1 or n_close != 1 or response.lstrip().find(THINK_OPEN) != 0:
        return False
    thought, answer = response.split(THINK_OPEN, 1)[1].split(THINK_CLOSE, 1)
    return bool(thought.strip()) and bool(answer.strip())


def format_reward(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
    """1.0 when well formed (``sample`` keys ``require_think`` (default True), ``think_in_prompt``)."""
    del prompt
    ok = think_format_ok(
        response,
        require_think=bool(sample.get("require_think", True)),
        think_in_prompt=bool(sample.get("think_in_prompt", False)),
    )
    return float(ok)


def repetition_penalty(text: str, *, n: int = 4, min_ngrams: int = 8) -> float:
    """``-(1 - #distinct n-grams / #n-grams)`` in [-1, 0]; 0 for texts with fewer than ``min_ngrams``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    words = _WORD.findall(text.lower())
    total = len(words) - n + 1
    if total < max(min_ngrams, 1):
        return 0.0
    distinct = len({tuple(words[i : i + n]) for i in range(total)})
    return 0.0 if distinct == total else -(1.0 - distinct / total)


def repetition_reward(prompt: str, response: str, sample: Mapping[str, Any], *, n: int = 4) -> float:
    """Protocol wrapper of :func:`repetition_penalty` on the whole response."""
    del prompt, sample
    return repetition_penalty(response, n=n)


@functools.lru_cache(maxsize=8192)
def script_of(ch: str) -> str | None:
    """The script of a letter (``"latin"``, ``"cjk"``, ``"cyrillic"``, ...), ``"other"``, or ``None`` for non-letters."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    code = ord(ch)
    for name, lo, hi in _SCRIPT_RANGES:
        if lo <= code <= hi:
            return name
    return "other"


class _NextFinder:
    """``text.find(sub, start)`` for non-decreasing ``start``s, each part of ``text`` searched once per ``sub``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.known: dict[str, tuple[int, int]] = {}  # sub -> (searched from, found at or -1)

    def find(self, sub: str, start: int) -> int:
        searched, found = self.known.get(sub, (len(self.text) + 1, -1))
        if searched <= start and (found < 0 or found >= start):
            return found  # nothing between `searched` and `found`, so nothing between `start` and it
        found = self.text.find(sub, start)
        self.known[sub] = (start, found)
        return found


def _without_math_or_code(text: str) -> str:
    """``text`` with math, code spans and LaTeX commands replaced by a space, in one linear pass."""
    pieces: list[str] = []
    finder = _NextFinder(text)
    kept = pos = 0
    while (m := _SPAN_START.search(text, pos)) is not None:
        i = end = m.start()
        for opener, closer in _SPANS:
            if text.startswith(opener, i):
                close = finder.find(closer, i + len(opener))
                if close >= 0:
                    end = close + len(closer)
                    break
        else:
            command = _COMMAND.match(text, i)
            end = command.end() if command else i
        if end == i:
            pos = i + 1
            continue
        pieces += [text[kept:i], " "]
        kept = pos = end
    pieces.append(text[kept:])
    return "".join(pieces)


def _script_counts(text: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    run_script, run_len = None, 0
    for ch in _without_math_or_code(text) + " ":
        script = script_of(ch)
        if script == run_script and script is not None:
            run_len += 1
            continue
        if run_script is not None and (run_script not in _SHORT_RUN_SCRIPTS or run_len >= 3):
            counts[run_script] += run_len
        run_script, run_len = script, 1
    return counts


def dominant_script(text: str) -> str | None:
    """The script holding most counted letters of ``text`` (math/code ignored), or ``None``."""
    counts = _script_counts(text)
    return counts.most_common(1)[0][0] if counts else None


def code_switching_penalty(prompt: str, response: str, *, tolerance: float = 0.02) -> float:
    """``-share`` of the response's counted letters outside the prompt's script, 0 when ``share <= tolerance``.

    A prompt without letters (pure math) has no script and gives 0.
    """
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    script = dominant_script(prompt)
    counts = _script_counts(response)
    total = sum(counts.values())
    if script is None or total == 0:
        return 0.0
    share = 1.0 - counts[script] / total
    return -share if share > tolerance else 0.0


def code_switching_reward(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
    """Protocol wrapper of :func:`code_switching_penalty`."""
    del sample
    return code_switching_penalty(prompt, response)


def soft_overlong_penalty(length: int | torch.Tensor, max_length: int, cache_length: int) -> float | torch.Tensor:
    """DAPO's soft overlong penalty for a response of ``length`` tokens (int or a tensor of lengths).

    Raises:
        ValueError: ``cache_length`` not in ``(0, max_length]`` or a negative length.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(
            f"need 0 < cache_length <= max_length, got cache_length={cache_length}, max_length={max_length}"
        )
    soft_start = max_length - cache_length
    if isinstance(length, torch.Tensor):
        if (length < 0).any():
            raise ValueError(f"lengths must be >= 0, got min {int(length.min())}")
        lf = length.to(torch.float32)
        ramp = (soft_start - lf) / cache_length
        return torch.where(
            lf <= soft_start, torch.zeros_like(lf), torch.where(lf <= max_length, ramp, -torch.ones_like(lf))
        )
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if length <= soft_start:
        return 0.0
    if length <= max_length:
        return (soft_start - length) / cache_length
    return -1.0
