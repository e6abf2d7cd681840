"""Rewards on hostile text: linear time, bounded sympy work, overflow as a zero with a reason, hedges."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

import vl_rl.rewards as R
from vl_rl.rewards import collect_reasons
from vl_rl.rewards.extract import MAX_BOXES, TRUNCATED, find_boxed


def _fast(fn: Callable[[], Any], budget_s: float = 0.5) -> Any:
    start = time.perf_counter()
    value = fn()
    elapsed = time.perf_counter() - start
    assert elapsed < budget_s, f"took {elapsed:.2f} s (budget {budget_s} s)"
    return value


@pytest.mark.parametrize(
    "response",
    [
        "\\boxed" * 8000,  # every command scanned the rest of the text for a token
        "\\boxed " + "1" * 100_000,
        "\\boxed{" * 8000 + "}" * 8000,  # nested boxes: quadratic total content
        "<|begin_of_box|>" * 8000 + "<|end_of_box|>",
        "<answer>" * 8000 + "</answer>",
    ],
    ids=["boxed-run", "long-token", "nested", "glm-box", "answer-tags"],
)
def test_extraction_is_linear(response: str) -> None:
    _fast(lambda: R.extract_answer(response))
    _fast(lambda: R.answer_text(response))


def test_box_limits_are_explicit() -> None:
    assert R.extract_answer("\\boxed{7} " * MAX_BOXES) == "7"
    with collect_reasons() as why:
        assert R.extract_answer("\\boxed{7} " * (MAX_BOXES + 1)) is None
    assert why == ["too_many_boxes"]
    (content,) = find_boxed("\\boxed{" + "x" * 20_000 + "}")
    assert content.endswith(TRUNCATED) and len(content) < 10_100
    (token,) = find_boxed("\\boxed " + "9" * 20_000)
    assert token.endswith(TRUNCATED)
    assert R.math_reward("", "\\boxed{" + "1" * 20_000 + "}", {"answer": "1" * 20_000}) == 0.0


@pytest.mark.parametrize("opener", ["\\[", "\\(", "```", "$$", "`", "$"])
def test_code_switching_is_linear(opener: str) -> None:
    # an unclosed "\[" used to be searched for a "\]" to the end of the text at every later "\["
    assert _fast(lambda: R.code_switching_penalty("hello there", opener * 30_000 + " 中文中文")) <= 0.0


def test_code_switching_still_ignores_closed_math_and_code() -> None:
    prompt = "Solve this problem please"
    assert R.code_switching_penalty(prompt, "The answer is $\\alpha = \\beta$ and `фывапролд` here") == 0.0
    assert R.code_switching_penalty(prompt, "The answer \\[ 中文中文中文 \\] holds") == 0.0
    assert R.code_switching_penalty(prompt, "Die Antwort ist 中文中文中文中文中文中文") < 0.0


def test_tool_call_counting_is_linear() -> None:
    assert _fast(lambda: R.count_tool_calls("<tool_call>" * 40_000)) == 0
    assert R.count_tool_calls("<tool_call>a</tool_call> x <tool_call><tool_call>b</tool_call>") == 2
    assert _fast(lambda: R.tool_reward("", "<tool_call>" * 40_000 + "</tool_call>", {})) == 1.0


def test_ocr_is_bit_parallel_and_bounded() -> None:
    ref = "the quick brown fox jumps over the lazy dog " * 12
    noisy = ref.replace("o", "0") * 40  # about 21k characters against 0.5k: no gap shortcut
    value = _fast(lambda: R.ocr_reward("", noisy, {"answer": ref}))
    assert 0.0 <= value < 0.1
    assert _fast(lambda: R.ocr_reward("", "\\boxed" * 8000, {"answer": "x"})) == 0.0
    with collect_reasons() as why:
        assert R.ocr_reward("", "a" * 2_000_000, {"answer": "b" * 1_000}) == 0.0
    assert why == ["text_too_long"]
    with pytest.raises(ValueError, match="max_cells"):
        R.ocr_similarity("ab" * 100, "ba" * 100, max_cells=100)


@pytest.mark.parametrize(
    "response",
    [
        r"\boxed{x*(((9^{99})^{99})^{99})^{99}}",
        r"\boxed{((x+1)^{99})^{99}}",
        r"\boxed{(a+b+c+d+e+f+g+h)^{40}}",
        r"\boxed{(x+1)^{99}(y+1)^{99}(z+1)^{99}}",
        r"\boxed{\sqrt{-x}(a+b+c+d+e+f+g+h)^{16}}",
        r"\boxed{2^{99}^{99}}",
    ],
)
def test_math_reward_never_builds_huge_expressions(response: str) -> None:
    R.math_reward("", r"\boxed{1}", {"answer": "x+y"})  # sympy imported outside the budget
    assert _fast(lambda: R.math_reward("", response, {"answer": "x+y"}), budget_s=2.0) == 0.0


def test_math_identities_still_verified() -> None:
    assert R.math_reward("", r"\boxed{(x+1)^{2}}", {"answer": "x^2+2x+1"}) == 1.0
    assert R.math_reward("", r"\boxed{\frac{x^{2}-1}{x-1}}", {"answer": "x+1"}) == 1.0
    assert R.math_reward("", r"\boxed{(x+1)^{3}}", {"answer": "x^3+3x^2+3x+2"}) == 0.0


def test_overflow_is_a_zero_reward_with_a_reason() -> None:
    with collect_reasons() as why:
        assert R.count_reward("", r"\boxed{1e999}", {"answer": 3}) == 0.0
        assert R.count_reward("", r"\boxed{" + "9" * 40 + "}", {"answer": 3}) == 0.0
        big = "9" * 400
        assert R.grounding_reward("", f"[0, 0, {big}, 10]", {"answer": [[0, 0, 10, 10]]}) == 0.0
        assert R.grounding_reward("", f'[{{"bbox_2d": [0, 0, 10, {big}]}}]', {"answer": [[0, 0, 10, 10]]}) == 0.0
    assert why == ["number_out_of_range"] * 4
    assert R.parse_count("1e999") is None
    assert R.parse_timestamp(big + ":00:00") is None and R.parse_timestamp("1" + "0" * 400) is None
    assert R.timestamp_reward("", r"\boxed{" + big + ":00:00}", {"answer": 3}) == 0.0
    assert R.chart_reward("", r"\boxed{1e999}", {"answer": "5"}) == 0.0
    assert R.count_reward("", r"\boxed{12345678901234567890123}", {"answer": 12345678901234567890123}) == 1.0


@pytest.mark.parametrize(
    "response",
    [
        "(A) or (B)",
        "A. Or maybe B. Or C. Or D.",
        r"\boxed{(A) or (B)}",
        "The answer is (A), or possibly (C)",
        "A) or B)",
        "A: cat, B: dog",
        "A, or B",
    ],
)
def test_hedges_score_zero(response: str) -> None:
    sample = {"answer": "A", "options": ["cat", "dog", "eel", "fox"]}
    with collect_reasons() as why:
        assert R.choice_reward("", response, sample) == 0.0
    assert why == ["hedge"]


@pytest.mark.parametrize("response", ["A", "(A)", "A. cat", "A: cat", "The answer is (A).", "A. A cat sits there."])
def test_single_choices_still_score(response: str) -> None:
    assert R.choice_reward("", response, {"answer": "A", "options": ["cat", "dog", "eel", "fox"]}) == 1.0


def test_choice_text_naming_a_letter_of_its_own_option() -> None:
    options = {"A": "Vitamin C.", "B": "Vitamin D."}
    assert R.extract_choice("A. Vitamin C.", options) == "A"
    assert R.extract_choice("A. Vitamin D.", options) is None


def test_reasons_are_collected_only_when_asked() -> None:
    assert R.count_reward("", r"\boxed{1e999}", {"answer": 3}) == 0.0  # no collector: nothing kept, no error
    with collect_reasons() as outer:
        R.choice_reward("", "(A) or (B)", {"answer": "A"})
        with collect_reasons() as inner:
            R.extract_answer(r"\boxed{1} \boxed{2}")
    assert outer == ["hedge"] and inner == ["conflicting_answers"]
