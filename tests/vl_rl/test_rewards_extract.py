"""Answer extraction: markers, think handling, several boxes, fallback."""

from __future__ import annotations

import pytest

from vl_rl.rewards.extract import answer_region, answer_text, extract_answer, find_boxed, last_number


def test_boxed_with_nested_braces() -> None:
    assert extract_answer(r"so \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert extract_answer(r"\fbox{7}") == "7"
    assert extract_answer(r"\boxed 5 is it") == "5"


def test_glm_box_and_answer_tags() -> None:
    assert extract_answer("x <|begin_of_box|>42<|end_of_box|>") == "42"
    assert extract_answer("<answer> 3 </answer>") == "3"
    assert extract_answer(r"<answer>\boxed{4}</answer>") == "4"


def test_several_boxes_same_answer_accepted_different_refused() -> None:
    assert extract_answer(r"\boxed{3} ... so \boxed{ 3 }") == "3"
    assert extract_answer(r"\boxed{3} or \boxed{4}") is None
    assert extract_answer(r"\boxed{3} or <|begin_of_box|>4<|end_of_box|>") is None
    assert extract_answer("<answer>1</answer><answer>2</answer>") is None
    assert extract_answer(r"\boxed{3} or \boxed{4}", on_conflict="last") == "4"
    assert extract_answer(r"\boxed{3} or \boxed{4}", on_conflict="first") == "3"
    with pytest.raises(ValueError, match="on_conflict"):
        extract_answer("x", on_conflict="any")  # type: ignore[arg-type]


def test_think_block_answers_do_not_count() -> None:
    assert extract_answer(r"<think>maybe \boxed{5}</think> the answer is \boxed{6}") == "6"
    assert extract_answer(r"<think>\boxed{5}</think> no box here") is None
    # truncated inside the think block: no answer at all
    assert extract_answer(r"<think>I think \boxed{5} and then") is None
    assert answer_region("<think>a") is None
    # <think> opened by the chat template: only </think> in the response
    assert extract_answer(r"reasoning \boxed{1}</think>\boxed{2}") == "2"
    assert answer_region("no tags") == "no tags"


def test_last_number_fallback_only_when_asked() -> None:
    text = "the result is 12, not 1,000 or 3.5e2"
    assert extract_answer(text) is None
    assert extract_answer(text, fallback_last_number=True) == "3.5e2"
    assert last_number("about 50% of") == "50%"
    assert last_number("none") is None
    assert extract_answer("<think>7</think>", fallback_last_number=True) is None


def test_empty_and_unclosed() -> None:
    assert extract_answer("") is None
    assert extract_answer("   ") is None
    assert extract_answer(r"\boxed{3") is None
    assert extract_answer("<|begin_of_box|>3") is None
    assert find_boxed(r"\boxed{a}\boxed{b{c}}") == ["a", "b{c}"]


def test_answer_text_never_falls_back_on_conflict() -> None:
    assert answer_text(r"\boxed{A} \boxed{B} the answer is A") is None
    assert answer_text("plain answer") == "plain answer"
    assert answer_text("plain answer", require_marker=True) is None
