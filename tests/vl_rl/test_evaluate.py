"""Held-out evaluation: per-task means, sampled vs greedy, failing rewards, bad input."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from _rl_helpers import samples, tiny
from _threads import one_thread

from vl_rl.evaluate import EvalResult, evaluate, prompt_of, sample_reward
from vl_rl.rewards import SafeReward
from vl_rl.rollout import Rollout


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


class EchoEngine:
    """Answers every sample with its own answer when ``right`` says so, else with "wrong"."""

    def __init__(self, right: Any) -> None:
        self.right, self.calls = right, []  # type: ignore[var-annotated]

    def generate(self, batch: Sequence[dict[str, Any]], group_size: int, *, greedy: bool = False) -> Rollout:
        self.calls.append((len(batch), group_size, greedy))
        texts = [str(s["answer"]) if self.right(s) else "wrong" for s in batch for _ in range(group_size)]
        rows = len(texts)
        return Rollout(
            samples=list(batch),
            group_size=group_size,
            sequences=torch.zeros(rows, 2, dtype=torch.long),
            prompt_length=1,
            completion_mask=torch.ones(rows, 1, dtype=torch.bool),
            texts=texts,
            truncated=torch.zeros(rows, dtype=torch.bool),
            model_inputs={},
        )


def test_per_task_means_and_counts() -> None:
    from vl_train.data.synthetic import verify

    batch = samples(6, tasks=("count", "colour"))
    engine = EchoEngine(lambda s: s["task"] == "count")
    result = evaluate(None, None, batch, verify, engine=engine, batch_size=4)  # type: ignore[arg-type]
    assert isinstance(result, EvalResult)
    assert result.per_task == {"colour": 0.0, "count": 1.0} and result.count == {"colour": 3, "count": 3}
    assert result.mean == 0.5 and len(result.responses) == 6 and result.errors == 0
    assert engine.calls == [(4, 1, True), (2, 1, True)]  # greedy, one response per sample, in batches
    sampled = evaluate(None, None, batch, verify, engine=engine, greedy=False, samples_per_prompt=3)  # type: ignore[arg-type]
    assert engine.calls[-1] == (6, 3, False) and len(sampled.responses) == 18 and sampled.count["count"] == 9


def test_failing_rewards_score_zero_and_are_counted() -> None:
    def broken(sample: dict[str, Any], response: str) -> float:
        raise KeyError("answer")

    result = evaluate(None, None, samples(3), broken, engine=EchoEngine(lambda s: True))  # type: ignore[arg-type]
    assert result.mean == 0.0 and result.errors == 3 and result.rewards == [0.0, 0.0, 0.0]
    nan = evaluate(None, None, samples(2), lambda s, r: float("nan"), engine=EchoEngine(lambda s: True))  # type: ignore[arg-type]
    assert nan.errors == 2 and nan.mean == 0.0


def test_reward_wrapping_and_prompt_text() -> None:
    sample = samples(1)[0]
    assert prompt_of(sample).startswith("How many") and prompt_of({"messages": []}) == ""
    safe = sample_reward(lambda s, r: 2.0)
    assert isinstance(safe, SafeReward) and safe("p", "r", sample) == 2.0 and sample_reward(safe) is safe
    with pytest.raises(TypeError, match="callable"):
        sample_reward(3)  # type: ignore[arg-type]


def test_real_model_greedy_is_reproducible_and_bad_input() -> None:
    model, processor = tiny()
    batch = samples(3)
    reward = lambda s, r: float(len(r))
    a = evaluate(model, processor, batch, reward, max_new_tokens=3, thinking=False)
    b = evaluate(model, processor, batch, reward, max_new_tokens=3, thinking=False)
    assert a.responses == b.responses and len(a.responses) == 3
    s1 = evaluate(model, processor, batch, reward, max_new_tokens=3, greedy=False, samples_per_prompt=2, seed=1)
    s2 = evaluate(model, processor, batch, reward, max_new_tokens=3, greedy=False, samples_per_prompt=2, seed=1)
    assert s1.responses == s2.responses and len(s1.responses) == 6
    with pytest.raises(ValueError, match="needs samples"):
        evaluate(model, processor, [], reward)
    with pytest.raises(ValueError, match="samples_per_prompt"):
        evaluate(model, processor, batch, reward, samples_per_prompt=0)
