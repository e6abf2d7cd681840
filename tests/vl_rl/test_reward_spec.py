"""The [reward] recipe section: verifiers by name, options, your function, judges (HTTP and local), terms, tasks."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

pytest.importorskip("vl_train", reason="the recipe reward reads vl-train's recipe checks")

from vl_rl.reward_spec import VERIFIERS, OpenAIJudge, build_reward
from vl_rl.rewards import code_switching_penalty, repetition_penalty, soft_overlong_penalty


def prompt(text: str = "What is shown?", **fields: Any) -> dict[str, Any]:
    return {"id": "p", "messages": [{"role": "user", "content": text}], **fields}


@pytest.mark.parametrize(
    ("verifier", "sample", "right", "wrong"),
    [
        ("math", prompt(answer="1/2"), "so \\boxed{0.5}", "\\boxed{0.4}"),
        ("math", prompt(answer="12"), "<think>x</think>The answer is <|begin_of_box|>12<|end_of_box|>", "12"),
        ("number", prompt(answer="1000"), "\\boxed{1,000}", "\\boxed{999}"),
        ("choice", prompt(answer="B"), "The answer is (B)", "A or B"),
        ("count", prompt(answer=3), "three", "3 or 4"),
        ("grounding", prompt(answer=[[0, 0, 100, 100]]), "\\boxed{[0, 0, 100, 100]}", "\\boxed{[500, 500, 600, 600]}"),
        ("ocr", prompt(answer="hello"), "\\boxed{hello}", "\\boxed{xyz}"),
        ("chart", prompt(answer="20"), "\\boxed{20.5}", "\\boxed{30}"),
        ("timestamp", prompt(answer=[1.0, 3.0]), "\\boxed{1.2-3.1}", "\\boxed{5-9}"),
    ],
)
def test_verifiers_by_name(verifier: str, sample: dict[str, Any], right: str, wrong: str) -> None:
    reward = build_reward({"verifier": verifier})
    assert reward(sample, right) == pytest.approx(1.0) and reward(sample, wrong) == 0.0
    assert reward.needs_answer("default") and reward.description == f"default: verifier {verifier!r}"


def test_synthetic_verifier_and_default() -> None:
    from vl_train.data.synthetic import SyntheticDataset

    sample = SyntheticDataset("train", size=1, tasks=["count"], image_size_range=(48, 64))[0]
    assert build_reward({}, default_verifier="synthetic")(sample, str(sample["answer"])) == 1.0
    with pytest.raises(ValueError, match="names no reward"):
        build_reward({})


def test_options_are_checked_against_the_verifier() -> None:
    strict = build_reward({"verifier": "choice", "options": {"require_marker": True}})
    assert strict(prompt(answer="B"), "B") == 0.0 and strict(prompt(answer="B"), "\\boxed{B}") == 1.0
    loose = build_reward({"verifier": "chart", "options": {"rel_tol": 0.5}})
    assert loose(prompt(answer="20"), "\\boxed{29}") == 1.0
    with pytest.raises(ValueError, match=r"verifier 'choice' must be callable as .*rel_tol"):
        build_reward({"verifier": "choice", "options": {"rel_tol": 0.5}})
    with pytest.raises(ValueError, match=r"verifier 'regex' is not one of \['chart'"):
        build_reward({"verifier": "regex"})
    with pytest.raises(ValueError, match="choose one base reward"):
        build_reward({"verifier": "math", "function": "os:getcwd"})
    with pytest.raises(ValueError, match=r"\[reward\] key 'format_weight' must be a number"):
        build_reward({"verifier": "math", "format_weight": "high"})


def test_weighted_terms() -> None:
    from vl_train.testing import make_demo_processor

    tokenizer = make_demo_processor().tokenizer
    spec = {"verifier": "count", "format_weight": 0.5, "repetition_weight": 0.25, "code_switching_weight": 2.0}
    reward = build_reward({**spec, "overlong_weight": 1.0, "overlong_cache": 4}, tokenizer=tokenizer, max_new_tokens=8)
    sample = prompt("How many cats are there?", answer=2)
    thought = "<think>\ncount them\n</think>\n\n2"
    overlong = soft_overlong_penalty(len(tokenizer.encode(thought, add_special_tokens=False)), 8, 4)
    assert reward(sample, thought) == pytest.approx(1.5 + overlong)
    assert reward(sample, "2") == pytest.approx(1.0)  # no think block: no format point, short: no penalty
    loop = " ".join(["red circle blue square"] * 6) + " 2"
    tokens = len(tokenizer.encode(loop, add_special_tokens=False))
    expected = 1.0 + 0.25 * repetition_penalty(loop) + soft_overlong_penalty(tokens, 8, 4)
    assert tokens > 8 and reward(sample, loop) == pytest.approx(expected)
    mixed, switching = "两只 two", build_reward({"verifier": "count", "code_switching_weight": 2.0})
    penalty = code_switching_penalty(sample["messages"][0]["content"], mixed)
    assert penalty < 0 and switching(sample, mixed) == pytest.approx(1.0 + 2.0 * penalty)
    assert "0.5 * format" in reward.description and "1 * overlong" in reward.description


def test_per_task_rewards_and_coverage() -> None:
    section = {
        "verifier": "math",
        "repetition_weight": 1.0,
        "tasks": {
            "ocr": {"verifier": "ocr"},
            "count": {"verifier": "count", "repetition_weight": 0.0},
            "free": {"function": "vl_rl.rewards:format_reward"},
        },
    }
    reward = build_reward(section)
    assert reward(prompt(task="ocr", answer="abc"), "\\boxed{abc}") == 1.0
    assert reward(prompt(task="count", answer=2), "2") == 1.0
    assert reward(prompt(task="other", answer="7"), "\\boxed{7}") == 1.0  # the top-level base covers the rest
    loop = " ".join(["red circle blue square"] * 6)
    assert reward(prompt(task="count", answer=2), loop + " 2") == 1.0  # the task turned repetition off
    assert reward(prompt(task="ocr", answer="x"), loop) < 0
    assert reward.needs_answer("ocr") and not reward.needs_answer("free") and reward.covers("anything")
    no_default = build_reward({"tasks": {"ocr": {"verifier": "ocr"}}})
    assert no_default.covers("ocr") and not no_default.covers("math")
    with pytest.raises(ValueError, match=r"\[reward.tasks.ocr\] names no base reward"):
        build_reward({"tasks": {"ocr": {"format_weight": 1.0}}})
    with pytest.raises(ValueError, match=r"unknown keys \['verfier'\] in \[reward.tasks.ocr\]"):
        build_reward({"tasks": {"ocr": {"verfier": "ocr"}}})


def test_your_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "def exact(prompt, response, sample, *, case=True):\n"
        "    a, b = response.strip(), str(sample['answer'])\n"
        "    return float(a == b if case else a.lower() == b.lower())\n"
        "def two_args(sample, response):\n    return 1.0\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    monkeypatch.setitem(sys.modules, "my_rewards", None)  # restored (removed) after the test ...
    monkeypatch.delitem(sys.modules, "my_rewards")  # ... and imported afresh from tmp_path now
    reward = build_reward({"function": "my_rewards:exact", "options": {"case": False}})
    assert reward(prompt(answer="Cat"), "cat") == 1.0 and not reward.needs_answer("default")
    problems = {
        "my_rewards": "must look like 'package.module:callable'",
        "no_such_module_xyz:f": r"'no_such_module_xyz:f': cannot import module 'no_such_module_xyz' \(ModuleNotFound",
        "my_rewards:missing": "'my_rewards:missing': 'my_rewards' has no attribute 'missing'",
        "my_rewards:NOT_CALLABLE": "is a int, not a callable",
        "my_rewards:two_args": r"'my_rewards:two_args' must be callable as fn\(prompt, response, sample\)",
    }
    for spec, match in problems.items():
        with pytest.raises(ValueError, match=match):
            build_reward({"function": spec})


class _JudgeServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat-completions endpoint that grades '4' right and anything else wrong."""

    requests: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        text = body["messages"][0]["content"]
        score = 10 if "<candidate>\n4\n</candidate>" in text else 0
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": f"Score: {score}"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def judge_url() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _JudgeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_judge_over_http(judge_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_KEY", "secret")
    _JudgeServer.requests.clear()
    section = {"judge": {"url": judge_url, "model_name": "grader", "api_key_env": "JUDGE_KEY", "timeout_s": 5.0}}
    reward = build_reward({**section, "format_weight": 0.0})
    sample = prompt("2 + 2?", answer="4")
    assert reward(sample, "4") == 1.0 and reward(sample, "5") == 0.0
    sent = _JudgeServer.requests[0]
    assert sent["path"] == "/v1/chat/completions" and sent["model"] == "grader" and sent["auth"] == "Bearer secret"
    assert "Reference answer: 4" in sent["messages"][0]["content"] and sent["temperature"] == 0.0
    # a dead endpoint: the call is bounded by its timeout and scores 0 (counted by the JudgeReward)
    dead = build_reward({"judge": {"url": "http://127.0.0.1:9/v1", "timeout_s": 2.0}})
    assert dead(sample, "4") == 0.0 and dead.reward.stats["errors"] == 1  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="http:// or https://"):
        OpenAIJudge("file:///etc/passwd")
    with pytest.raises(ValueError, match="exactly one of model"):
        build_reward({"judge": {"url": judge_url, "model": "x"}})
    with pytest.raises(ValueError, match="'NO_SUCH_KEY_ENV', which is not set"):
        build_reward({"judge": {"url": judge_url, "api_key_env": "NO_SUCH_KEY_ENV"}})


def test_judge_from_a_local_model(tmp_path: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from vl_train.testing import make_demo_processor

    tokenizer = make_demo_processor().tokenizer
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    Qwen3ForCausalLM(config).save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    reward = build_reward({"judge": {"model": str(tmp_path / "judge"), "max_new_tokens": 3}})
    assert reward(prompt(answer="4"), "4") == 0.0  # a random judge writes no score: 0, counted
    assert reward.reward.stats["calls"] == 1 and reward.reward.stats["parse_errors"] == 1  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="is not a folder"):
        build_reward({"judge": {"model": str(tmp_path / "nowhere")}})


def test_every_verifier_is_documented() -> None:
    from vl_rl import reward_spec

    assert reward_spec.__doc__ is not None
    assert set(VERIFIERS) == {
        "math",
        "number",
        "choice",
        "count",
        "grounding",
        "ocr",
        "chart",
        "timestamp",
        "synthetic",
    }
