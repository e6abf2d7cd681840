"""Why an RL run learned nothing: the causes of steps without learning signal, read from the step records.

A step has no signal when every group's rewards are equal (every advantage 0). :func:`no_signal_message`
names what the records show: one response per prompt, a reward that fails, every response scoring the
same value (0: the verifier never matched; the top value: every prompt solved), groups dropped by
``filter_solved`` or not found by dynamic sampling, or prompts whose responses agree within each group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .rewards import SafeReward

__all__ = ["no_signal_message"]


def _causes(records: Sequence[dict[str, Any]], group_size: int, reward: SafeReward) -> list[str]:
    causes = []
    if group_size < 2:
        causes.append("group_size is 1: one response per prompt has no group baseline, so every advantage is 0")
    if reward.errors:
        causes.append(
            f"{reward.errors} of {reward.calls} reward calls failed and scored 0 ({reward.timeouts} timed out; last "
            f"error: {reward.last_error})"
        )
    empty = [r for r in records if not r.get("groups")]
    if empty and any(r.get("groups_filtered") for r in empty):
        causes.append("filter_solved dropped every group of some steps (all their prompts were solved)")
    if empty and any("sample_rounds" in r for r in empty):
        causes.append("dynamic sampling found no group with mixed rewards within max_sample_rounds")
    flat = [r for r in records if r.get("groups") and float(r.get("reward_std", 1.0)) == 0.0]
    if flat:
        values = sorted({round(float(r["reward_mean"]), 6) for r in flat})
        passing = [float(r.get("pass_rate", 0.0)) for r in flat]
        if all(p == 0.0 for p in passing):
            causes.append(
                f"every response scored {values} on {len(flat)} steps and none passed: the reward never matched, so "
                "the responses may not be in the form the verifier reads (a final answer, \\boxed{...}), the "
                "answers in the data may be wrong, max_new_tokens may cut the answers off, or the prompts are too "
                "hard for this policy"
            )
        elif all(p == 1.0 for p in passing):
            causes.append(f"every response passed on {len(flat)} steps: the prompts are too easy for this policy")
        else:
            causes.append(f"every response of {len(flat)} steps scored the same ({values})")
    mixed = [r for r in records if r.get("no_signal") and r.get("groups") and float(r.get("reward_std", 0.0)) > 0]
    if mixed:
        causes.append(
            f"on {len(mixed)} steps the responses to each prompt all scored alike (all right or all wrong), though "
            "prompts differed: raise group_size or temperature, filter prompts (prefilter_rollouts) or resample "
            "(dynamic_sampling)"
        )
    return causes


def no_signal_message(records: Sequence[dict[str, Any]], group_size: int, reward: SafeReward) -> str | None:
    """A warning naming the causes when more than half of ``records`` had no learning signal; else None."""
    no_signal = [r for r in records if r.get("no_signal")]
    if not records or len(no_signal) <= len(records) / 2:
        return None
    causes = _causes(no_signal, group_size, reward) or ["every group's rewards were equal"]
    return (
        f"{len(no_signal)} of {len(records)} RL steps had no learning signal (every response of every group got the "
        "same reward), so they changed nothing. Causes seen: " + "; ".join(causes) + "."
    )
