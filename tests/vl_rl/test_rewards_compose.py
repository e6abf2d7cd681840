"""Composition, routing and safe execution (raising, hanging, NaN rewards; empty/truncated responses)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest

import vl_rl.rewards as R
from vl_rl.rewards.compose import RewardFunction, combine, route_by_task, safe_reward, score_batch


def _const(value: float) -> RewardFunction:
    def fn(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
        return value

    return fn


def test_combine_weighted_sum_and_components() -> None:
    reward = combine({"acc": (_const(1.0), 1.0), "fmt": (_const(0.5), 0.2), "rep": (_const(-0.25), 2.0)})
    assert reward("p", "r", {}) == pytest.approx(1.0 + 0.1 - 0.5)
    assert reward.components("p", "r", {}) == {"acc": 1.0, "fmt": 0.5, "rep": -0.25}
    assert isinstance(reward, RewardFunction)
    with pytest.raises(ValueError, match="at least one"):
        combine({})
    with pytest.raises(ValueError, match="fn, weight"):
        combine({"x": _const(1.0)})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="not callable"):
        combine({"x": (3, 1.0)})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="non-finite"):
        combine({"x": (_const(1.0), float("nan"))})


def test_route_by_task() -> None:
    router = route_by_task({"math": R.math_reward, "count": R.count_reward})
    assert router("", r"\boxed{1/2}", {"task": "math", "answer": "0.5"}) == 1.0
    assert router("", r"\boxed{three}", {"task": "count", "answer": 3}) == 1.0
    with pytest.raises(ValueError, match="no reward for task='ocr'"):
        router("", "x", {"task": "ocr"})
    fallback = route_by_task({"math": R.math_reward}, default=_const(0.25))
    assert fallback("", "x", {"task": "ocr"}) == 0.25
    assert fallback("", "x", {}) == 0.25


def test_safe_reward_raising_hanging_nan() -> None:
    def boom(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
        raise KeyError("answer")

    release = threading.Event()

    def hang(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
        release.wait(5)
        return 1.0

    safe = safe_reward(boom, name="boom")
    assert safe("p", "r", {}) == 0.0
    assert safe.errors == 1 and safe.calls == 1 and "KeyError" in (safe.last_error or "")
    assert safe.metrics() == {"reward/boom/errors": 1.0, "reward/boom/timeouts": 0.0}
    slow = safe_reward(hang, timeout_s=0.05)
    start = time.perf_counter()
    assert slow("p", "r", {}) == 0.0
    assert time.perf_counter() - start < 2
    assert slow.timeouts == 1 and slow.errors == 1
    release.set()
    nan = safe_reward(_const(float("nan")))
    assert nan("p", "r", {}) == 0.0 and nan.errors == 1
    ok = safe_reward(_const(0.75), timeout_s=1.0)
    assert ok("p", "r", {}) == 0.75 and ok.errors == 0
    with pytest.raises(ValueError, match="timeout_s"):
        safe_reward(boom, timeout_s=0)


def test_safe_reward_in_combination_counts_per_part() -> None:
    def boom(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
        raise RuntimeError("bad verifier")

    safe = safe_reward(boom)
    reward = combine({"acc": (safe, 1.0), "fmt": (_const(1.0), 0.5)})
    assert [reward("p", "r", {}) for _ in range(3)] == [0.5, 0.5, 0.5]
    assert safe.errors == 3


ALL_REWARDS = [
    (R.math_reward, {"answer": "1"}),
    (R.choice_reward, {"answer": "A"}),
    (R.count_reward, {"answer": 1}),
    (R.ocr_reward, {"answer": "text"}),
    (R.timestamp_reward, {"answer": 1.0}),
    (R.chart_reward, {"answer": "1"}),
    (R.grounding_reward, {"answer": [[0, 0, 10, 10]]}),
    (R.format_reward, {}),
    (R.repetition_reward, {}),
    (R.code_switching_reward, {}),
    (R.tool_reward, {"target_tool_calls": 1}),
]


@pytest.mark.parametrize(("fn", "sample"), ALL_REWARDS)
@pytest.mark.parametrize(
    "response",
    ["", "   ", "<think>truncated reasoning with \\boxed{1", "<think>", "</think>", "\\boxed{", "<|begin_of_box|>"],
)
def test_empty_and_truncated_never_raise(fn: RewardFunction, sample: dict[str, Any], response: str) -> None:
    value = fn("Prompt text?", response, sample)
    assert isinstance(value, float)
    assert -1.0 <= value <= 0.0


def test_score_batch() -> None:
    scores = score_batch(R.math_reward, ["", ""], [r"\boxed{2}", r"\boxed{3}"], [{"answer": 2}, {"answer": 2}])
    assert scores == [1.0, 0.0]
    with pytest.raises(ValueError, match="lengths differ"):
        score_batch(R.math_reward, [""], [], [])


def test_public_names_exported() -> None:
    for name in R.__all__:
        assert hasattr(R, name), name


PATHOLOGICAL = [
    "\\boxed{" * 5000,
    "<answer>" * 5000,
    "<|begin_of_box|>" * 3000,
    "[" * 20000,
    "{" * 20000,
    "1" * 20000,
    "中a" * 20000,
]


@pytest.mark.parametrize(("fn", "sample"), ALL_REWARDS)
def test_pathological_long_responses_are_fast(fn: RewardFunction, sample: dict[str, Any]) -> None:
    for response in PATHOLOGICAL:
        start = time.perf_counter()
        value = fn("Prompt text?", response, sample)
        assert isinstance(value, float)
        assert time.perf_counter() - start < 1.0, response[:20]


# ----------------------------------------------------------------------------- the worker process


def _spin(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
    """CPU-bound and GIL-holding: a thread timeout could only abandon it."""
    while True:
        pass


def _die(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
    import os

    os._exit(3)


def _pid(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
    import os

    return float(os.getpid())


def test_cpu_bound_hang_is_killed_and_the_worker_restarts() -> None:
    import os

    safe = safe_reward(_spin, timeout_s=0.3, name="spin")
    start = time.perf_counter()
    assert safe("p", "r", {}) == 0.0
    assert time.perf_counter() - start < 3
    assert safe.timeouts == 1 and safe.errors == 1 and "killed" in (safe.last_error or "")
    assert safe.metrics()["reward/spin/timeouts"] == 1.0
    safe.fn = _pid  # type: ignore[assignment]  # the next worker is a new process
    safe._runner.fn = _pid  # type: ignore[union-attr]
    first = safe("p", "r", {})
    assert first not in (0.0, float(os.getpid())) and safe("p", "r", {}) == first  # one persistent worker
    assert safe._runner.starts == 2  # type: ignore[union-attr]


def test_math_hang_from_the_issue_returns() -> None:
    safe = safe_reward(R.math_reward, timeout_s=5.0)
    start = time.perf_counter()
    assert safe("", r"\boxed{x*(((9^{99})^{99})^{99})^{99}}", {"answer": "x"}) == 0.0
    assert time.perf_counter() - start < 5 and safe.timeouts == 0  # bounded by construction, not by the kill
    assert safe("", r"\boxed{\frac{1}{2}}", {"answer": "0.5"}) == 1.0


def test_worker_death_bad_arguments_and_reasons_are_reported() -> None:
    dead = safe_reward(_die, timeout_s=5.0)
    assert dead("p", "r", {}) == 0.0 and dead.errors == 1 and "exit code 3" in (dead.last_error or "")
    assert dead("p", "r", {}) == 0.0 and dead.errors == 2  # a fresh worker, dead again
    ok = safe_reward(R.count_reward, timeout_s=5.0)
    assert ok("p", r"\boxed{3}", {"answer": 3, "handle": threading.Lock()}) == 0.0
    assert "cannot be sent" in (ok.last_error or "")
    assert ok("p", r"\boxed{3}", {"answer": 3}) == 1.0
    assert ok("p", r"\boxed{1e999}", {"answer": 3}) == 0.0 and ok.errors == 1
    assert ok.metrics()["reward/count_reward/zero/number_out_of_range"] == 1.0


def test_fork_takes_closures_spawn_needs_picklable_functions() -> None:
    offset = 0.25
    closure = safe_reward(lambda p, r, s: offset + len(r), timeout_s=5.0)
    assert closure("p", "abc", {}) == 3.25
    with pytest.raises(TypeError, match=r"cannot be pickled.*module level"):
        safe_reward(lambda p, r, s: 1.0, timeout_s=5.0, start_method="spawn")
    with pytest.raises(ValueError, match="isolation"):
        safe_reward(_pid, timeout_s=1.0, isolation="fiber")  # type: ignore[arg-type]


def test_thread_isolation_keeps_in_process_state() -> None:
    seen: list[str] = []

    def record(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
        seen.append(response)
        return 1.0

    assert safe_reward(record, timeout_s=5.0, isolation="thread")("p", "a", {}) == 1.0
    assert seen == ["a"]
    assert safe_reward(record, timeout_s=5.0)("p", "b", {}) == 1.0
    assert seen == ["a"]  # a worker process changed its own copy


def test_nested_safe_rewards_and_copies() -> None:
    import copy
    import pickle

    inner = safe_reward(R.math_reward, timeout_s=5.0)
    outer = safe_reward(combine({"acc": (inner, 1.0), "fmt": (R.format_reward, 0.5)}), timeout_s=10.0)
    assert outer("", r"<think>ok</think>\boxed{2}", {"answer": "2"}) == 1.5 and outer.errors == 0
    twin = copy.deepcopy(inner)
    assert twin("", r"\boxed{2}", {"answer": "2"}) == 1.0
    assert pickle.loads(pickle.dumps(inner))("", r"\boxed{3}", {"answer": "2"}) == 0.0
    inner.close()
    assert inner("", r"\boxed{2}", {"answer": "2"}) == 1.0  # restarted after close


def test_concurrent_callers_share_one_worker() -> None:
    from concurrent.futures import ThreadPoolExecutor

    safe = safe_reward(R.math_reward, timeout_s=10.0)
    cases = [(rf"\boxed{{{i}}}", {"answer": str(i % 3)}) for i in range(24)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: safe("", c[0], c[1]), cases))
    assert got == [float(i % 3 == i) for i in range(24)] and safe.calls == 24 and safe.errors == 0


def _score_in_daemon(conn: Any) -> None:
    safe = safe_reward(R.math_reward, timeout_s=5.0)
    conn.send((safe("", r"\boxed{2}", {"answer": "2"}), safe.errors))


def test_safe_reward_inside_a_daemonic_process_falls_back_to_a_thread() -> None:
    import multiprocessing

    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    worker = context.Process(target=_score_in_daemon, args=(child,), daemon=True)  # e.g. a data-loader worker
    worker.start()
    assert parent.poll(20) and parent.recv() == (1.0, 0)  # daemons may not start the worker process
    worker.join(5)
