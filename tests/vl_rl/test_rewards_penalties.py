"""Format, repetition, code-switching, DAPO soft-overlong and tool-calling rewards."""

from __future__ import annotations

import random

import pytest
import torch

from vl_rl.rewards.penalties import (
    code_switching_penalty,
    dominant_script,
    format_reward,
    repetition_penalty,
    script_of,
    soft_overlong_penalty,
    think_format_ok,
)
from vl_rl.rewards.tool import count_tool_calls, tool_call_reward, tool_reward


@pytest.mark.parametrize(
    ("response", "ok"),
    [
        ("<think>reason</think> answer", True),
        ("  <think>reason</think>\n\\boxed{1}", True),
        ("<think>reason</think>", False),  # no answer
        ("<think></think> answer", False),  # empty thought
        ("<think>reason", False),  # truncated
        ("answer", False),  # thinking required
        ("pre <think>r</think> answer", False),  # think not first
        ("<think>a</think><think>b</think> answer", False),
        ("<think>a</think> x </think> answer", False),
        ("</think> answer <think>", False),
        ("", False),
    ],
)
def test_think_format(response: str, ok: bool) -> None:
    assert think_format_ok(response) is ok
    assert format_reward("", response, {}) == float(ok)


def test_think_format_options() -> None:
    assert think_format_ok("plain answer", require_think=False)
    assert think_format_ok("<think>r</think> a", require_think=False)
    assert not think_format_ok("<think>r a", require_think=False)
    assert think_format_ok("reason</think> a", think_in_prompt=True)
    assert not think_format_ok("<think>reason</think> a", think_in_prompt=True)
    assert format_reward("", "plain", {"require_think": False}) == 1.0


def _repetition_reference(text: str, n: int) -> float:
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return -(1 - len(set(grams)) / len(grams))


def test_repetition_against_reference() -> None:
    rng = random.Random(0)
    for _ in range(30):
        words = [rng.choice(["a", "b", "c", "d", "e"]) for _ in range(rng.randint(12, 40))]
        text = " ".join(words)
        n = rng.randint(1, 4)
        assert repetition_penalty(text, n=n) == pytest.approx(_repetition_reference(text, n))


def test_repetition_regimes() -> None:
    assert repetition_penalty("one two three four five six seven eight nine ten eleven twelve") == 0.0
    assert repetition_penalty("the answer is " * 50) < -0.9
    assert repetition_penalty("的" * 100) < -0.9  # CJK characters count as words
    assert repetition_penalty("short") == 0.0
    assert repetition_penalty("") == 0.0
    with pytest.raises(ValueError, match="n must be"):
        repetition_penalty("a", n=0)


def test_scripts() -> None:
    assert script_of("a") == "latin"
    assert script_of("é") == "latin"
    assert script_of("中") == "cjk"
    assert script_of("ж") == "cyrillic"
    assert script_of("1") is None
    assert dominant_script("Привет, как дела?") == "cyrillic"
    assert dominant_script("1 + 1 = ?") is None


def test_code_switching() -> None:
    en = "What is the area of the square?"
    zh = "这个正方形的面积是多少？"
    assert code_switching_penalty(en, "The area is 4 cm, so \\boxed{4}") == 0.0
    assert code_switching_penalty(en, "面积是四") == -1.0
    # counted: The, area, four (11 Latin; "is" is under 3 letters) and 2 CJK letters
    assert code_switching_penalty(en, "The area 面积 is four") == pytest.approx(-2 / 13)
    assert code_switching_penalty(zh, "面积是 4 cm，因为 $x^2 = 4$，\\boxed{4}") == 0.0  # math, units allowed
    assert code_switching_penalty(zh, "面积是 `print(area)` 和 ```python\nimport math\n```") == 0.0  # code allowed
    assert code_switching_penalty(zh, "The area is four") == -1.0
    assert code_switching_penalty(zh, "Площадь четыре") == -1.0
    assert code_switching_penalty("1+1=?", "два") == 0.0  # prompt without a script
    assert code_switching_penalty(en, "") == 0.0
    assert code_switching_penalty(en, "π r squared, θ angle") == 0.0  # Greek math symbols
    with pytest.raises(ValueError, match="tolerance"):
        code_switching_penalty(en, "x", tolerance=1.0)


def _overlong_reference(length: int, lmax: int, lcache: int) -> float:
    if length <= lmax - lcache:
        return 0.0
    if length <= lmax:
        return ((lmax - lcache) - length) / lcache
    return -1.0


def test_soft_overlong_three_regimes() -> None:
    assert soft_overlong_penalty(50, 100, 20) == 0.0
    assert soft_overlong_penalty(80, 100, 20) == 0.0
    assert soft_overlong_penalty(90, 100, 20) == pytest.approx(-0.5)
    assert soft_overlong_penalty(100, 100, 20) == pytest.approx(-1.0)
    assert soft_overlong_penalty(101, 100, 20) == -1.0
    lengths = torch.arange(0, 130)
    out = soft_overlong_penalty(lengths, 100, 20)
    assert isinstance(out, torch.Tensor)
    expected = torch.tensor([_overlong_reference(int(n), 100, 20) for n in lengths])
    torch.testing.assert_close(out, expected)
    assert [soft_overlong_penalty(int(n), 100, 20) for n in lengths] == pytest.approx(expected.tolist())
    for bad in [(10, 100, 0), (10, 100, 101)]:
        with pytest.raises(ValueError, match="cache_length"):
            soft_overlong_penalty(*bad)
    with pytest.raises(ValueError, match="length"):
        soft_overlong_penalty(-1, 100, 20)
    with pytest.raises(ValueError, match="lengths"):
        soft_overlong_penalty(torch.tensor([-1]), 100, 20)


def test_tool_call_reward_formula() -> None:
    for n in range(8):
        for target in range(5):
            assert tool_call_reward(n, target) == pytest.approx(max(0.0, 1 - abs(n - target) / max(target, 1)))
    assert tool_call_reward(2, 2) == 1.0
    assert tool_call_reward(0, 0) == 1.0
    assert tool_call_reward(1, 0) == 0.0
    assert tool_call_reward(4, 2) == 0.0
    with pytest.raises(ValueError, match="n_calls"):
        tool_call_reward(-1, 1)


def test_tool_reward_from_response_or_sample() -> None:
    response = "<tool_call>{}</tool_call> x <tool_call>{}</tool_call> <tool_call>unclosed"
    assert count_tool_calls(response) == 2
    assert tool_reward("", response, {"target_tool_calls": 2}) == 1.0
    assert tool_reward("", response, {"target_tool_calls": 1}) == 0.0
    assert tool_reward("", "", {"num_tool_calls": 1}) == 1.0
