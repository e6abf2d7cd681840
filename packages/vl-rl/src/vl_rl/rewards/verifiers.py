"""Rule verifiers for multiple choice, counting, OCR, timestamps and chart values (REFERENCE.md section 5).

Each verifier has a pure comparison (``extract_choice``, ``parse_count``, ``ocr_similarity``,
``parse_timestamp``, ...) and a reward of the protocol ``(prompt, response, sample) -> float`` that
reads the reference from ``sample["answer"]``.

Anti-hacking rules (each has a test): answers inside the think block never count (see ``extract``);
two different boxed answers give nothing; a reply naming several options ("A B C D", "A or B",
"(A) or (B)", "A. Or maybe B.") or several numbers ("between 1 and 10", "3 or 4") gives nothing; OCR
divides the edit distance by the *longer* string, so repeating the reference k times scores about 1/k.

Bounded time and no crashes on untrusted text: the number patterns never backtrack (linear time), a
number out of float range ("1e999") or of absurd length is a zero reward with the reason
``"number_out_of_range"`` (see ``collect_reasons``) instead of an ``OverflowError``, and the OCR
distance is bit-parallel (Myers/Hyyrö: ``|p| * |r| / 64`` word operations) and refused above
``MAX_OCR_CELLS`` character pairs (reason ``"text_too_long"``).

Notation: ``lev(a, b)`` is the Levenshtein distance; OCR similarity is
``1 - lev(p, r) / max(|p|, |r|)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from vl_rl.rewards._reasons import zero
from vl_rl.rewards.extract import answer_text, normalize_answer

__all__ = [
    "MAX_OCR_CELLS",
    "chart_reward",
    "choice_reward",
    "count_reward",
    "edit_distance",
    "extract_choice",
    "ocr_reward",
    "ocr_similarity",
    "parse_count",
    "parse_timestamp",
    "timestamp_reward",
]

_UNITS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_WORDS = {w: i for i, w in enumerate(_UNITS)} | _TENS | {"hundred": 100, "a dozen": 12, "dozen": 12}
_NUMBER_WORD = re.compile(
    r"\b(?:("
    + "|".join(_TENS)
    + r")[- ]("
    + "|".join(_UNITS[1:10])
    + r")|("
    + "|".join(sorted(_WORDS, key=len, reverse=True))
    + r"))\b",
    re.IGNORECASE,
)
# atomic: a number never gives back digits to retry the look-ahead (that retrying was quadratic)
_NUMBER = re.compile(r"(?<![\w.])(?>[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![\w.]*\d)")
_INTEGER = re.compile(r"\d{1,30}")
MAX_OCR_CELLS = 10**9
"""Most character pairs (``|p| * |r|``) an OCR similarity compares (about a second of work)."""


def _reference(sample: Mapping[str, Any], reward: str) -> Any:
    if "answer" not in sample:
        raise ValueError(f"{reward} needs sample['answer']; sample keys are {sorted(sample)}")
    return sample["answer"]


def extract_choice(
    text: str, options: Sequence[str] | Mapping[str, str] | None = None, letters: str = "ABCDE"
) -> str | None:
    """The single option letter a short answer names, or ``None``.

    Accepted: ``"B"``, ``"(B)"``, ``"B."``, ``"B: dog"``, ``"The answer is B"``, or the exact text of
    one option. Refused (hedges): several letters (``"A B C D"``, ``"A or B"``), a letter whose
    trailing text names another option by its text or by its letter written as an option
    (``"(A) or (B)"``, ``"A. Or maybe B. Or C."``: ``"(B)"``, ``"B."``, ``"B)"``, ``"B:"``, ``"B,"``, or
    a letter ending the text).

    Args:
        text: The extracted answer.
        options: Option texts, in letter order or keyed by letter; limit the valid letters.
        letters: Valid letters when ``options`` is not given.
    """
    if isinstance(options, Mapping):
        table = {k.strip().upper(): v for k, v in options.items()}
    elif options is not None:
        table = {chr(ord("A") + i): v for i, v in enumerate(options)}
    else:
        table = {}
    valid = "".join(table) if table else letters.upper()
    if not valid:
        raise ValueError("extract_choice needs at least one valid letter")
    by_text = {normalize_answer(v): k for k, v in table.items()}
    s = text.strip().strip("$").strip()
    if normalize_answer(s) in by_text:
        return by_text[normalize_answer(s)]
    s = re.sub(r"^(?:the\s+)?(?:final\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*", "", s, flags=re.IGNORECASE)
    m = re.fullmatch(rf"\(?([{valid}])\)?(?:\s*[.:)]\s*(.*))?\s*", s, flags=re.DOTALL)
    if m:
        letter, rest = m.group(1), (m.group(2) or "").strip()
        if rest and by_text.get(normalize_answer(rest), letter) != letter:
            return None  # "B. <text of option C>" contradicts itself
        if rest and normalize_answer(rest) == normalize_answer(table.get(letter, "\0")):
            return letter  # "B. <text of option B>"
        others = re.finditer(rf"(?<![A-Za-z])\(?([{valid}])(?:\)|\s*[.:,;]|\s*$)", rest)
        if any(m.group(1) != letter for m in others):
            zero("hedge")
            return None  # "(A)(B)", "A. B. C.", "(A) or (B)", "A. Or maybe B." name several options
        return letter
    found = set(re.findall(rf"(?<![A-Za-z])\(?([{valid}])\)?(?![A-Za-z])", s))
    if len(found) > 1:
        zero("hedge")
    return found.pop() if len(found) == 1 and len(s) <= 40 else None


def choice_reward(prompt: str, response: str, sample: Mapping[str, Any], *, require_marker: bool = False) -> float:
    """1.0 when the chosen letter equals ``sample["answer"]`` (a letter; ``sample["options"]`` optional)."""
    del prompt
    text = answer_text(response, require_marker=require_marker)
    if text is None:
        return 0.0
    options = sample.get("options")
    letters = "".join(options) if isinstance(options, Mapping) else "ABCDE"
    ref = str(_reference(sample, "choice_reward")).strip().strip("()").upper()
    return float(extract_choice(text, options, letters) == ref)


def parse_count(text: str) -> int | None:
    """The single non-negative integer a short answer states (digits or English words), or ``None``.

    ``"3"``, ``"3 apples"``, ``"three"``, ``"twenty-one"`` parse; ``"3 or 4"``, ``"between 1 and
    10"``, ``"2.5"``, ``"-1"`` do not, nor do numbers out of range (``"1e999"``, 31 digits or more).
    """
    values: list[int] = []
    for m in _NUMBER.finditer(text):
        token = m.group(0).replace(",", "")
        if _INTEGER.fullmatch(token):
            values.append(int(token))
            continue
        try:
            value = float(token)
        except ValueError:
            return None
        if not math.isfinite(value) or abs(value) >= 1e30:
            zero("number_out_of_range")
            return None
        if value < 0 or value != int(value):
            return None
        values.append(int(value))
    for m in _NUMBER_WORD.finditer(text):
        if m.group(1):
            values.append(_TENS[m.group(1).lower()] + _WORDS[m.group(2).lower()])
        else:
            values.append(_WORDS[m.group(3).lower()])
    return values[0] if len(set(values)) == 1 else None


def count_reward(prompt: str, response: str, sample: Mapping[str, Any], *, require_marker: bool = False) -> float:
    """1.0 when the stated count equals ``sample["answer"]`` (an int)."""
    del prompt
    text = answer_text(response, require_marker=require_marker)
    if text is None:
        return 0.0
    if len(text) > 200:
        return zero("answer_too_long")
    return float(parse_count(text) == int(_reference(sample, "count_reward")))


def _edit_distance_dp(a: Sequence[Any], b: Sequence[Any]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Levenshtein distance (insert, delete, substitute all cost 1), O(|a| |b| / 64) word operations.

    Hashable items (characters, words) use Myers' bit-vector algorithm in Hyyrö's formulation
    (arXiv cs/0112012 style; one Python integer holds a column of the dynamic-programming table as
    bits), anything else the plain O(|a| |b|) table.
    """
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    if not all(isinstance(item, Hashable) for item in b):
        return _edit_distance_dp(a, b)
    match: dict[Any, int] = {}  # item -> bit mask of its positions in b
    for i, item in enumerate(b):
        match[item] = match.get(item, 0) | (1 << i)
    mask, top = (1 << m) - 1, 1 << (m - 1)
    plus, minus, score = mask, 0, m  # vertical +1 / -1 deltas of the current column; D[|a| so far][m]
    for item in a:
        eq = match.get(item, 0) if isinstance(item, Hashable) else 0
        xv = eq | minus
        xh = (((eq & plus) + plus) ^ plus) | eq
        h_plus = minus | ~(xh | plus)
        h_minus = plus & xh
        if h_plus & top:
            score += 1
        elif h_minus & top:
            score -= 1
        h_plus = (h_plus << 1) | 1  # the first row grows by 1 per item of a
        h_minus <<= 1
        plus = (h_minus | ~(xv | h_plus)) & mask
        minus = h_plus & xv & mask
    return score


def ocr_similarity(
    pred: str, ref: str, *, level: str = "char", normalize_space: bool = True, max_cells: int = MAX_OCR_CELLS
) -> float:
    """``1 - lev(pred, ref) / max(|pred|, |ref|)`` on characters or words; 1.0 when both are empty.

    When the length gap alone already bounds the score to ~0 (e.g. the reference repeated many
    times) the distance is skipped.

    Raises:
        ValueError: Unknown ``level``, or ``|pred| * |ref|`` above ``max_cells`` (too long to compare).
    """
    if level not in ("char", "word"):
        raise ValueError(f"level must be 'char' or 'word', got {level!r}")
    if normalize_space:
        pred, ref = " ".join(pred.split()), " ".join(ref.split())
    p: Sequence[str] = pred.split() if level == "word" else pred
    r: Sequence[str] = ref.split() if level == "word" else ref
    longest = max(len(p), len(r))
    if longest == 0:
        return 1.0
    if abs(len(p) - len(r)) / longest > 0.999:
        return 1.0 - abs(len(p) - len(r)) / longest if min(len(p), len(r)) == 0 else 0.0
    if len(p) * len(r) > max_cells:
        raise ValueError(f"{len(p)} x {len(r)} {level}s is above max_cells={max_cells}: too long to compare")
    return 1.0 - edit_distance(p, r) / longest


def ocr_reward(prompt: str, response: str, sample: Mapping[str, Any], *, level: str = "char") -> float:
    """OCR similarity of the answer (boxed/tagged, else the answer region) to ``sample["answer"]``."""
    del prompt
    ref = str(_reference(sample, "ocr_reward")).strip()
    text = answer_text(response)
    if text is None:
        return 0.0
    p, r = text.strip(), ref
    if len(p) * len(r) > MAX_OCR_CELLS:
        return zero("text_too_long")
    return ocr_similarity(p, r, level=level)


def parse_timestamp(text: str) -> float | None:
    """Seconds from ``"hh:mm:ss(.f)"``, ``"mm:ss"``, ``"12.5s"``, ``"12.5 seconds"`` or ``"12.5"``."""
    s = text.strip().strip("<>").strip().lower()
    m = re.fullmatch(r"(?:(\d+):)?(\d{1,2}):(\d{1,2}(?:\.\d+)?)", s)
    if m:  # hours as a float: a 400-digit hour count is inf, not an OverflowError
        hours, minutes, seconds = float(m.group(1) or 0), int(m.group(2)), float(m.group(3))
        total = hours * 3600 + minutes * 60 + seconds
        return None if minutes >= 60 or seconds >= 60 or not math.isfinite(total) else total
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:s|sec|secs|second|seconds)?", s)
    return float(m.group(1)) if m and math.isfinite(float(m.group(1))) else None


def _parse_times(text: str) -> list[float] | None:
    parts = [p for p in re.split(r"\s*(?:-|–|to|,)\s*", text.strip().strip("[]()")) if p]
    times = [parse_timestamp(p) for p in parts]
    return None if any(t is None for t in times) else [t for t in times if t is not None]


def timestamp_reward(prompt: str, response: str, sample: Mapping[str, Any], *, tolerance_s: float = 1.0) -> float:
    """1.0 when every predicted time is within ``tolerance_s`` of the reference.

    ``sample["answer"]`` is one time or a ``[start, end]`` pair (seconds or strings); the prediction
    must have the same number of times.
    """
    del prompt
    if tolerance_s < 0:
        raise ValueError(f"tolerance_s must be >= 0, got {tolerance_s}")
    text = answer_text(response)
    ref = _reference(sample, "timestamp_reward")
    refs = list(ref) if isinstance(ref, list | tuple) else [ref]
    ref_times = [float(r) if isinstance(r, int | float) else parse_timestamp(str(r)) for r in refs]
    if text is None or any(r is None for r in ref_times):
        return 0.0
    pred = _parse_times(text)
    if pred is None or len(pred) != len(ref_times):
        return 0.0
    return float(all(abs(p - float(r)) <= tolerance_s for p, r in zip(pred, ref_times) if r is not None))


def chart_reward(prompt: str, response: str, sample: Mapping[str, Any], *, rel_tol: float = 0.05) -> float:
    """Chart QA: numbers within ``rel_tol`` relative error of ``sample["answer"]``; text answers must match."""
    del prompt
    if rel_tol < 0:
        raise ValueError(f"rel_tol must be >= 0, got {rel_tol}")
    text = answer_text(response)
    if text is None:
        return 0.0
    if len(text) > 200:
        return zero("answer_too_long")
    ref = str(_reference(sample, "chart_reward")).strip()
    ref_numbers = _NUMBER.findall(ref.replace("%", ""))
    if len(ref_numbers) != 1:
        return float(normalize_answer(text) == normalize_answer(ref))
    numbers = _NUMBER.findall(text.replace("%", ""))
    if len(set(numbers)) != 1:
        return 0.0
    p, r = float(numbers[0].replace(",", "")), float(ref_numbers[0].replace(",", ""))
    return float(abs(p - r) <= rel_tol * abs(r) if r != 0 else abs(p) <= 1e-9)
