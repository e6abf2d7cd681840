"""Judge-model reward: a (Hugging Face or any) model scores a response against a reference.

Qwen3-VL's general RL uses model judges scoring responses against references (REFERENCE.md
section 5). ``JudgeReward`` fills ``prompt_template`` with ``{prompt}``, ``{response}`` and
``{reference}``, calls the judge, and maps its text to [0, 1] with ``parse_score``.

Robustness: results are cached by ``(prompt, response, reference)``; a judge call runs in a daemon
thread with ``timeout_s``, and a timeout, an exception or an unparsable verdict gives reward 0 and
increments a counter (``stats``). A hung judge thread cannot be killed, only abandoned: it keeps
running in the background until the call returns.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from vl_rl.rewards._timeout import RewardTimeoutError, call_with_timeout

__all__ = ["DEFAULT_JUDGE_TEMPLATE", "JudgeReward", "LRUCache", "parse_judge_score"]

DEFAULT_JUDGE_TEMPLATE = (
    "You are grading an answer against a reference.\n"
    "Question: {prompt}\nReference answer: {reference}\nCandidate answer: {response}\n"
    "Reply with 'Score: N' where N is an integer from 0 (wrong) to 10 (fully correct)."
)
_SCORE = re.compile(r"score\s*[:=]?\s*(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?", re.IGNORECASE)


def parse_judge_score(text: str, *, max_score: float = 10.0) -> float | None:
    """``"Score: 7"`` or ``"Score: 7/10"`` (the last one wins) mapped to [0, 1]; ``None`` when absent."""
    matches = _SCORE.findall(text)
    if not matches:
        return None
    value, denominator = matches[-1]
    scale = float(denominator) if denominator else max_score
    if scale <= 0:
        return None
    return min(1.0, max(0.0, float(value) / scale))


class LRUCache(MutableMapping[Any, float]):
    """A thread-safe least-recently-used cache holding at most ``maxsize`` entries."""

    def __init__(self, maxsize: int = 10_000) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._data: OrderedDict[Any, float] = OrderedDict()
        self._lock = threading.Lock()

    def __getitem__(self, key: Any) -> float:
        with self._lock:
            self._data.move_to_end(key)
            return self._data[key]

    def __setitem__(self, key: Any, value: float) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def __delitem__(self, key: Any) -> None:
        with self._lock:
            del self._data[key]

    def __iter__(self) -> Any:
        return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)


def _hf_generate_fn(model: Any, tokenizer: Any, max_new_tokens: int) -> Callable[[str], str]:
    """Greedy generation with a Hugging Face causal LM (duck-typed: no transformers import here)."""
    import torch

    def generate(text: str) -> str:
        inputs = tokenizer(text, return_tensors="pt").to(model.device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return generate


class JudgeReward:
    """Reward ``(prompt, response, sample) -> float`` in [0, 1] from a judge model.

    Args:
        generate_fn: ``str -> str``; any callable judge. Give this or ``model`` + ``tokenizer``.
        model: A Hugging Face generative model (used with ``tokenizer``, greedy decoding).
        tokenizer: Its tokenizer.
        prompt_template: Format string with ``{prompt}``, ``{response}``, ``{reference}``.
        parse_score: Judge text -> score in [0, 1] or ``None`` (unparsable, counted as an error).
        cache: ``None`` (no cache), a dict-like, or an int for an :class:`LRUCache` of that size.
        timeout_s: Seconds per judge call; ``None`` waits forever.
        max_new_tokens: Generation length for the Hugging Face path.
        reference_key: Sample key of the reference answer.
    """

    def __init__(
        self,
        generate_fn: Callable[[str], str] | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        prompt_template: str = DEFAULT_JUDGE_TEMPLATE,
        parse_score: Callable[[str], float | None] = parse_judge_score,
        cache: MutableMapping[Any, float] | int | None = 10_000,
        timeout_s: float | None = 60.0,
        max_new_tokens: int = 64,
        reference_key: str = "answer",
    ) -> None:
        if generate_fn is None:
            if model is None or tokenizer is None:
                raise ValueError("JudgeReward needs generate_fn, or both model and tokenizer")
            generate_fn = _hf_generate_fn(model, tokenizer, max_new_tokens)
        for field in ("{prompt}", "{response}"):
            if field not in prompt_template:
                raise ValueError(f"prompt_template must contain {field}")
        try:
            prompt_template.format(prompt="", response="", reference="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"prompt_template has a field other than prompt/response/reference "
                f"(double literal braces as '{{{{' and '}}}}'): {exc!r}"
            ) from None
        self.generate_fn = generate_fn
        self.prompt_template = prompt_template
        self.parse_score = parse_score
        self.cache: MutableMapping[Any, float] | None = LRUCache(cache) if isinstance(cache, int) else cache
        self.timeout_s = timeout_s
        self.reference_key = reference_key
        self._lock = threading.Lock()
        self.stats: dict[str, int] = {"calls": 0, "cache_hits": 0, "errors": 0, "timeouts": 0, "parse_errors": 0}

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def __call__(self, prompt: str, response: str, sample: Mapping[str, Any]) -> float:
        """Scores one response; never raises for judge failures (0 and a counted error instead)."""
        if not response or not response.strip():
            return 0.0
        reference = str(sample.get(self.reference_key, ""))
        key = (prompt, response, reference)
        if self.cache is not None and key in self.cache:
            self._count("cache_hits")
            return self.cache[key]
        self._count("calls")
        text = self.prompt_template.format(prompt=prompt, response=response, reference=reference)
        try:
            verdict = call_with_timeout(self.generate_fn, (text,), self.timeout_s)
        except RewardTimeoutError:
            self._count("timeouts")
            self._count("errors")
            return 0.0
        except Exception:
            self._count("errors")
            return 0.0
        score = self.parse_score(str(verdict))
        if score is None:
            self._count("parse_errors")
            self._count("errors")
            return 0.0
        if self.cache is not None:
            self.cache[key] = score
        return score
