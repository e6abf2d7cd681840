"""Choice, count, OCR, timestamp and chart verifiers, each with hacking attempts."""

from __future__ import annotations

import functools
import random
from typing import Any

import pytest

from vl_rl.rewards.verifiers import (
    chart_reward,
    choice_reward,
    count_reward,
    edit_distance,
    extract_choice,
    ocr_reward,
    ocr_similarity,
    parse_count,
    parse_timestamp,
    timestamp_reward,
)

OPTIONS = ["cat", "dog", "eel", "fox"]


@pytest.mark.parametrize(
    "text", ["B", "(B)", "B.", "B)", "B: dog", "The answer is (B)", "answer: B", "dog", " b "[1:2].upper()]
)
def test_choice_accepts(text: str) -> None:
    assert extract_choice(text, OPTIONS) == "B"


@pytest.mark.parametrize(
    "text", ["A B C D", "A, B, C, D", "A or B", "(A)(B)", "A. B. C.", "A) B)", "B. eel", "E", "", "cow"]
)
def test_choice_refuses(text: str) -> None:
    assert extract_choice(text, OPTIONS) is None


def test_choice_reward_hacks() -> None:
    sample = {"answer": "B", "options": OPTIONS}
    assert choice_reward("", r"\boxed{B}", sample) == 1.0
    assert choice_reward("", "<answer>(B)</answer>", sample) == 1.0
    assert choice_reward("", r"\boxed{A B C D}", sample) == 0.0
    assert choice_reward("", r"\boxed{A} \boxed{B}", sample) == 0.0
    assert choice_reward("", r"\boxed{A} \boxed{B} so B", sample) == 0.0
    assert choice_reward("", r"<think>\boxed{B}</think> \boxed{C}", sample) == 0.0
    assert choice_reward("", "A B C D", sample) == 0.0
    assert choice_reward("", "B", sample) == 1.0
    assert choice_reward("", "B", sample, require_marker=True) == 0.0
    assert choice_reward("", "", sample) == 0.0
    assert choice_reward("", r"\boxed{B}", {"answer": "(b)"}) == 1.0
    assert choice_reward("", r"\boxed{Q}", {"answer": "Q", "options": {"P": "x", "Q": "y"}}) == 1.0


@pytest.mark.parametrize(
    ("text", "value"), [("3", 3), ("3 apples", 3), ("three", 3), ("Twenty-one", 21), ("1,000", 1000), ("0", 0)]
)
def test_parse_count(text: str, value: int) -> None:
    assert parse_count(text) == value


@pytest.mark.parametrize(
    "text", ["a number between 1 and 10", "3 or 4", "three or four", "2.5", "-1", "many", "3 (maybe 4)"]
)
def test_parse_count_refuses(text: str) -> None:
    assert parse_count(text) is None


def test_count_reward_hacks() -> None:
    sample = {"answer": 3}
    assert count_reward("", r"\boxed{3}", sample) == 1.0
    assert count_reward("", "There are three cats.", sample) == 1.0
    assert count_reward("", r"\boxed{between 1 and 10}", sample) == 0.0
    assert count_reward("", "<think>3</think> 4", sample) == 0.0
    assert count_reward("", " ".join(str(i) for i in range(10)), sample) == 0.0
    assert count_reward("", "", sample) == 0.0


def _lev_reference(a: str, b: str) -> int:
    @functools.cache
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def test_edit_distance_against_recursive_reference() -> None:
    rng = random.Random(0)
    for _ in range(60):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 11)))
        assert edit_distance(a, b) == _lev_reference(a, b)
        expected = 1.0 if not (a or b) else 1 - _lev_reference(a, b) / max(len(a), len(b))
        assert ocr_similarity(a, b, normalize_space=False) == pytest.approx(expected)


def test_ocr_hacks() -> None:
    ref = "The quick brown fox"
    assert ocr_reward("", ref, {"answer": ref}) == 1.0
    assert ocr_reward("", f"<answer>{ref}</answer>", {"answer": ref}) == 1.0
    repeated = ocr_reward("", " ".join([ref] * 10), {"answer": ref})
    assert repeated < 0.15
    assert ocr_reward("", "", {"answer": ref}) == 0.0
    assert ocr_reward("", "x" * 100_000, {"answer": ref}) == 0.0  # fast path, no quadratic blow-up
    assert ocr_similarity("a  b", "a b") == 1.0
    assert ocr_similarity("the cat sat", "the dog sat", level="word") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="level"):
        ocr_similarity("a", "b", level="line")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("01:02:03", 3723.0),
        ("1:02", 62.0),
        ("00:00:01.5", 1.5),
        ("12.5s", 12.5),
        ("12.5 seconds", 12.5),
        ("<3.0 seconds>", 3.0),
        ("7", 7.0),
    ],
)
def test_parse_timestamp(text: str, seconds: float) -> None:
    assert parse_timestamp(text) == seconds


@pytest.mark.parametrize("text", ["1:75", "soon", "", "1:2:3:4"])
def test_parse_timestamp_refuses(text: str) -> None:
    assert parse_timestamp(text) is None


def test_timestamp_reward() -> None:
    assert timestamp_reward("", r"\boxed{00:01:05}", {"answer": 65.5}) == 1.0
    assert timestamp_reward("", r"\boxed{00:01:08}", {"answer": 65.5}) == 0.0
    assert timestamp_reward("", r"\boxed{00:01:08}", {"answer": 65.5}, tolerance_s=3) == 1.0
    assert timestamp_reward("", "<answer>10.0 - 20.5</answer>", {"answer": ["10s", "00:20"]}) == 1.0
    assert timestamp_reward("", "<answer>10.0 - 30</answer>", {"answer": [10, 20]}) == 0.0
    # hedging with several times, or one time for an interval, earns nothing
    assert timestamp_reward("", r"\boxed{65, 66}", {"answer": 65}) == 0.0
    assert timestamp_reward("", r"\boxed{10}", {"answer": [10, 20]}) == 0.0
    assert timestamp_reward("", r"\boxed{between 1 and 100}", {"answer": 65}) == 0.0
    with pytest.raises(ValueError, match="tolerance"):
        timestamp_reward("", "1", {"answer": 1}, tolerance_s=-1)


def test_chart_reward() -> None:
    assert chart_reward("", r"\boxed{102}", {"answer": "100"}) == 1.0
    assert chart_reward("", r"\boxed{106}", {"answer": "100"}) == 0.0
    assert chart_reward("", r"\boxed{1,050}", {"answer": "1000"}) == 1.0
    assert chart_reward("", r"\boxed{45%}", {"answer": "45"}) == 1.0
    assert chart_reward("", r"\boxed{Germany}", {"answer": "germany"}) == 1.0
    assert chart_reward("", r"\boxed{between 90 and 110}", {"answer": "100"}) == 0.0
    assert chart_reward("", r"\boxed{0}", {"answer": "0"}) == 1.0
    assert chart_reward("", "", {"answer": "0"}) == 0.0


@pytest.mark.parametrize("fn", [choice_reward, count_reward, ocr_reward, timestamp_reward, chart_reward])
def test_missing_reference_is_a_clear_error(fn: Any) -> None:
    with pytest.raises(ValueError, match="needs sample\\['answer'\\]"):
        fn("", r"\boxed{1}", {"task": "x"})
