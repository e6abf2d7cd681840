"""Math verifier: numeric, LaTeX, symbolic (with and without sympy), hacking attempts."""

from __future__ import annotations

import random

import pytest

from vl_rl.rewards import math_verify
from vl_rl.rewards.math_verify import math_equal, math_reward, parse_number

EQUAL = [
    ("1/2", "0.5"),
    (r"\frac{1}{2}", "0.5"),
    (r"\dfrac12", "0.5"),
    ("-\\frac{3}{4}", "-0.75"),
    ("50%", "0.5"),
    (r"50\%", "50"),
    ("1,000", "1000"),
    ("1.5e3", "1500"),
    ("2^{10}", "1024"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    (r"\pi", "3.14159265"),
    ("x = 3", "3"),
    (r"3\text{ cm}", "3"),
    (r"90^\circ", "90"),
    ("(1, 2)", "(1,2)"),
    (r"\left[1, \frac{1}{2}\right)", "[1, 0.5)"),
    ("$0.333333$", "1/3"),
]
SYMBOLIC = [("2x+2", "2(x+1)"), ("x^2-1", "(x-1)(x+1)"), (r"\frac{x}{2}", "0.5x"), ("xy", "yx"), (r"\sqrt{x^2}", "x")]
DIFFERENT = [
    ("0.5", "0.6"),
    ("(2, 1)", "(1, 2)"),
    ("[1, 2]", "(1, 2)"),
    ("[1, 2)", "[1, 2]"),
    ("x+1", "x+2"),
    ("x^2", "x^3"),
    ("1", "(1, 1)"),
]


@pytest.mark.parametrize(("pred", "ref"), EQUAL)
def test_numeric_equal(pred: str, ref: str) -> None:
    assert math_equal(pred, ref)


@pytest.mark.parametrize("use_sympy", [None, False])
@pytest.mark.parametrize(("pred", "ref"), SYMBOLIC)
def test_symbolic_equal(pred: str, ref: str, use_sympy: bool | None) -> None:
    assert math_equal(pred, ref, use_sympy=use_sympy)


@pytest.mark.parametrize("use_sympy", [None, False])
@pytest.mark.parametrize(("pred", "ref"), DIFFERENT)
def test_different(pred: str, ref: str, use_sympy: bool | None) -> None:
    assert not math_equal(pred, ref, use_sympy=use_sympy)


def test_without_sympy_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(math_verify, "_sympy", lambda: None)
    assert math_equal("x^2+2x+1", "(x+1)^2")
    assert not math_equal("x^2+2x", "(x+1)^2")


def test_tolerances_against_formula() -> None:
    rng = random.Random(0)
    for _ in range(50):
        ref = rng.uniform(-1e3, 1e3)
        pred = ref * (1 + rng.uniform(-2e-4, 2e-4))
        expected = abs(pred - ref) <= max(1e-8, 1e-4 * abs(ref))
        assert math_equal(repr(pred), repr(ref)) == expected
    assert math_equal("1e-9", "0")
    assert not math_equal("1e-9", "0", abs_tol=0.0)
    with pytest.raises(ValueError, match="tolerances"):
        math_equal("1", "1", rel_tol=-1)


def test_parse_number() -> None:
    assert parse_number("3/4") == 0.75
    assert parse_number(r"-\frac12") == -0.5
    assert parse_number("50%") == 0.5
    assert parse_number("x") is None
    assert parse_number("two apples") is None


@pytest.mark.parametrize(
    "pred",
    [
        "a number between 1 and 10",
        "1 or 2",
        "1 2",
        "5 and 6",
        "9**9**9",
        "import os",
        "__import__('os')",
        "1" * 400,
        "x" * 5,
        "()",
    ],
)
def test_hacks_and_unsafe_inputs_rejected(pred: str) -> None:
    assert not math_equal(pred, "5")


def test_huge_exponent_is_fast() -> None:
    assert not math_equal("9^{9^{9}}", "1")
    assert not math_equal("x^{9^{9}}", "x")


def test_math_reward_hacks() -> None:
    sample = {"answer": "5"}
    assert math_reward("", r"\boxed{5}", sample) == 1.0
    assert math_reward("", r"<think>\boxed{5}</think> \boxed{4}", sample) == 0.0  # answer in the wrong place
    assert math_reward("", r"\boxed{4} \boxed{5}", sample) == 0.0  # several boxes, different answers
    assert math_reward("", r"\boxed{a number between 1 and 10}", sample) == 0.0
    assert math_reward("", "the answer is 5", sample) == 0.0  # no marker
    assert math_reward("", "the answer is 5", sample, fallback_last_number=True) == 1.0
    assert math_reward("", "", sample) == 0.0
    assert math_reward("", "<think>long reasoning, truncated", sample) == 0.0
    assert math_reward("", r"\boxed{5}", {"answer": 5}) == 1.0
    with pytest.raises(ValueError, match="answer"):
        math_reward("", r"\boxed{5}", {})
