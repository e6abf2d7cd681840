"""Tool-calling reward for tool-integrated ("thinking with images") rollouts (REFERENCE.md section 5).

``r_tool = max(0, 1 - |n - n*| / max(n*, 1))`` with ``n`` the number of tool calls made and ``n*``
the target (our choice, REFERENCE.md): 1 at the target, falling linearly, 0 at ``n = 2 n*`` or
beyond; with ``n* = 0`` every call costs 1.

Counting is one forward scan (linear time): ``re.findall(r"<tool_call>.*?</tool_call>")`` would search
to the end of the response again at every unclosed ``<tool_call>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["count_tool_calls", "tool_call_reward", "tool_reward"]

_TOOL_CALL = re.compile(r"<tool_call>.*?</tool_call>", re.DOTALL)
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


def tool_call_reward(n_calls: int, target: int) -> float:
    """``max(0, 1 - |n - n*| / max(n*, 1))``.

    Raises:
        ValueError: A negative count or target.
    """
    if n_calls < 0 or target < 0:
        raise ValueError(f"n_calls and target must be >= 0, got n_calls={n_calls}, target={target}")
    return max(0.0, 1.0 - abs(n_calls - target) / max(target, 1))


def count_tool_calls(response: str, *, pattern: re.Pattern[str] = _TOOL_CALL) -> int:
    """Number of complete ``<tool_call>...</tool_call>`` blocks in a response (Qwen/Hermes style).

    The default pattern is counted by a linear scan with the same result as ``len(pattern.findall(...))``;
    a custom ``pattern`` is used as given (its time is the pattern's).
    """
    if pattern is not _TOOL_CALL:
        return len(pattern.findall(response))
    count = pos = 0
    while (start := response.find(_OPEN, pos)) >= 0:
        end = response.find(_CLOSE, start + len(_OPEN))
        if end < 0:  # no later block can close either
            break
        count += 1
        pos = end + len(_CLOSE)
    return count


def tool_reward(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
    """Protocol wrapper: ``n`` from ``sample["num_tool_calls"]`` (set by the rollout) or counted in
    ``response``; ``n*`` from ``sample["target_tool_calls"]`` (default 1)."""
    del prompt
    n = sample.get("num_tool_calls")
    n_calls = count_tool_calls(response) if n is None else int(n)
    return tool_call_reward(n_calls, int(sample.get("target_tool_calls", 1)))
