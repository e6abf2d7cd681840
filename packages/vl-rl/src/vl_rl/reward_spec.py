"""The ``[reward]`` recipe section: a verifier, your own function or a judge, plus weighted penalty terms, per task.

Turns a recipe's ``[reward]`` table into the ``reward(sample, response) -> float`` that
:class:`vl_rl.trainer.RLTrainer` takes, from the public rewards of :mod:`vl_rl.rewards` (REFERENCE.md
section 5: rule verifiers, model judges against a reference, penalties for format errors, repetition and
code-switching; DAPO's soft overlong penalty). Every key is checked before any training::

    [reward]
    verifier = "math"            # or function = "my_pkg.rewards:score", or a [reward.judge] table
    options = { rel_tol = 1e-3 } # keyword arguments of the verifier / function, checked against its signature
    format_weight = 0.1          # + 0.1 * format_reward (think tags well formed)
    repetition_weight = 0.5      # + 0.5 * repetition_reward (in [-1, 0])
    code_switching_weight = 0.5  # + 0.5 * code_switching_reward (in [-1, 0]: the answer leaves the prompt's script)
    overlong_weight = 1.0        # + 1.0 * soft_overlong_penalty(tokens, max_new_tokens, overlong_cache)
    overlong_cache = 16

    [reward.tasks.grounding]     # prompts whose "task" is "grounding" get their own base reward
    verifier = "grounding"
    options = { threshold = 0.5 }

    [reward.judge]               # a judge model scoring against sample["answer"]
    url = "http://localhost:8000/v1"   # an OpenAI-compatible server (or model = "path/to/a/local/hf/model")
    model_name = "judge"

- **Base reward** (exactly one per scope): ``verifier`` (a name of :data:`VERIFIERS`), ``function``
  (``"module:callable"``, imported and checked to take ``(prompt, response, sample)``) or ``judge``
  (:class:`~vl_rl.rewards.JudgeReward` over a local Hugging Face causal LM or an OpenAI-compatible HTTP
  endpoint, :class:`OpenAIJudge`).
- **Terms**: ``<term>_weight`` keys add weighted terms to the base; they apply to every task.
- **Per task** (Qwen3-VL's mixed-task RL): ``[reward.tasks.NAME]`` tables hold a base reward (and may
  override term weights) for the prompts whose ``task`` is ``NAME``; the top-level base covers the rest.

Rewards follow :class:`vl_rl.rewards.RewardFunction` (``(prompt, response, sample) -> float``); the
callable returned here adapts them to the trainer's ``(sample, response)``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from .evaluate import prompt_of
from .rewards import (
    DEFAULT_JUDGE_TEMPLATE,
    JudgeReward,
    RewardFunction,
    chart_reward,
    choice_reward,
    code_switching_reward,
    combine,
    count_reward,
    format_reward,
    grounding_reward,
    math_reward,
    ocr_reward,
    repetition_reward,
    route_by_task,
    soft_overlong_penalty,
    timestamp_reward,
)

__all__ = ["REWARD_TYPES", "VERIFIERS", "OpenAIJudge", "RecipeReward", "build_reward", "import_reward"]


def _synthetic(prompt: str, response: str, sample: Mapping[str, Any]) -> float:
    """vl-train's synthetic-task verifier (:func:`vl_train.data.synthetic.verify`) in the reward protocol."""
    from vl_train.data.synthetic import verify

    del prompt
    return verify(dict(sample), response)


VERIFIERS: dict[str, RewardFunction] = {
    "math": math_reward,  # \boxed{}, GLM's <|begin_of_box|>, <answer>; numbers with tolerance, symbolic
    "number": math_reward,  # the same checker: numbers (1,000, 50 %, fractions) within rel_tol
    "choice": choice_reward,
    "count": count_reward,
    "grounding": grounding_reward,
    "ocr": ocr_reward,
    "chart": chart_reward,
    "timestamp": timestamp_reward,
    "synthetic": _synthetic,
}
"""Verifiers by ``[reward] verifier`` name; each reads the reference from ``sample["answer"]``."""

TERMS = ("format", "repetition", "code_switching", "overlong")
_BASES = ("verifier", "function", "judge")
REWARD_TYPES: dict[str, Any] = {
    "verifier": str,
    "function": str,
    "options": dict,
    "judge": dict,
    **{f"{t}_weight": float for t in TERMS},
    "overlong_cache": int,
    "tasks": dict,
}
"""``[reward]`` keys and their types (``[reward.tasks.NAME]`` takes the same keys but ``tasks``)."""
JUDGE_TYPES: dict[str, Any] = {
    "model": str,
    "url": str,
    "model_name": str,
    "api_key_env": str,
    "template": str,
    "max_new_tokens": int,
    "timeout_s": float,
    "cache": int,
}


class OpenAIJudge:
    """``text -> reply`` from an OpenAI-compatible chat-completions endpoint (vLLM, SGLang, TGI, a hosted API).

    Args:
        url: The API base, e.g. ``http://localhost:8000/v1`` (``/chat/completions`` is appended).
        model: The served model's name.
        max_tokens: Reply length.
        timeout_s: Seconds before the HTTP call gives up (the call is bounded in time by construction).
        api_key: Sent as a bearer token when given.

    Raises:
        ValueError: A URL that is not ``http(s)://``.
    """

    def __init__(
        self,
        url: str,
        model: str = "judge",
        *,
        max_tokens: int = 64,
        timeout_s: float = 60.0,
        api_key: str | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"judge url must start with http:// or https://, got {url!r}")
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model, self.max_tokens, self.timeout_s, self.api_key = model, max_tokens, timeout_s, api_key

    def __call__(self, text: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, json.dumps(body).encode(), headers, method="POST")
        with urllib.request.urlopen(
            request, timeout=self.timeout_s
        ) as response:  # the scheme was checked: http(s) only
            reply = json.loads(response.read().decode("utf-8"))
        return str(reply["choices"][0]["message"]["content"])


def import_reward(spec: str, where: str = "[reward] function") -> Callable[..., Any]:
    """The callable named by ``"module:attribute"`` (``"pkg.mod:obj.method"`` for nested attributes).

    Raises:
        ValueError: Not of that form, the module cannot be imported, it has no such attribute or the
            attribute is not callable; the message names ``spec``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{where} {spec!r} must look like 'package.module:callable'")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import-time error of the user's module: report it with the string
        raise ValueError(
            f"{where} {spec!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
        ) from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(
                f"{where} {spec!r}: {target.__name__ if hasattr(target, '__name__') else target!r} "
                f"has no attribute {part!r}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{where} {spec!r} is a {type(target).__name__}, not a callable")
    return target


def _check_call(fn: Callable[..., Any], options: Mapping[str, Any], where: str) -> None:
    """``fn(prompt, response, sample, **options)`` must bind; else a ValueError naming the signature."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return
    try:
        signature.bind("prompt", "response", {}, **options)
    except TypeError as exc:
        raise ValueError(
            f"{where} must be callable as fn(prompt, response, sample{', **options' if options else ''}) -> float "
            f"(options {sorted(options)}); its signature is {signature} ({exc})"
        ) from exc


class _WithOptions:
    """``fn(prompt, response, sample, **options)`` (a picklable partial that keeps the function's name)."""

    def __init__(self, fn: Callable[..., Any], options: Mapping[str, Any]) -> None:
        self.fn, self.options = fn, dict(options)
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, prompt: str, response: str, sample: Mapping[str, Any]) -> float:
        return float(self.fn(prompt, response, sample, **self.options))


class _Overlong:
    """DAPO's soft overlong penalty of a response, its length counted in the policy's tokens."""

    def __init__(self, tokenizer: Any, max_tokens: int, cache: int) -> None:
        self.tokenizer, self.max_tokens, self.cache = tokenizer, max_tokens, cache
        self.__name__ = "overlong"

    def __call__(self, prompt: str, response: str, sample: Mapping[str, Any]) -> float:
        tokens = len(self.tokenizer.encode(response, add_special_tokens=False))
        return float(soft_overlong_penalty(tokens, self.max_tokens, self.cache))


def _judge(section: Mapping[str, Any], where: str) -> RewardFunction:
    from vl_train.recipe import check_keys

    check_keys(where, section, JUDGE_TYPES)
    if ("model" in section) == ("url" in section):
        raise ValueError(
            f"{where} needs exactly one of model (a local Hugging Face model folder) or url (an "
            "OpenAI-compatible endpoint)"
        )
    common: dict[str, Any] = {
        "prompt_template": section.get("template", DEFAULT_JUDGE_TEMPLATE),
        "timeout_s": float(section.get("timeout_s", 60.0)),
        "cache": int(section.get("cache", 10_000)),
    }
    tokens = int(section.get("max_new_tokens", 64))
    if "url" in section:
        key_env = section.get("api_key_env")
        if key_env is not None and key_env not in os.environ:
            raise ValueError(f"{where} api_key_env names {key_env!r}, which is not set in the environment")
        endpoint = OpenAIJudge(
            str(section["url"]),
            str(section.get("model_name", "judge")),
            max_tokens=tokens,
            timeout_s=common["timeout_s"],
            api_key=os.environ.get(key_env) if key_env else None,
        )
        return JudgeReward(endpoint, **common)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(section["model"])
    if not os.path.isdir(path):
        raise ValueError(f"{where} model {path!r} is not a folder (a local Hugging Face causal LM with its tokenizer)")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return JudgeReward(model=model, tokenizer=AutoTokenizer.from_pretrained(path), max_new_tokens=tokens, **common)


def _base(scope: Mapping[str, Any], where: str) -> tuple[RewardFunction | None, bool]:
    """``(base reward or None, whether it reads sample["answer"])`` of one scope."""
    chosen = [k for k in _BASES if k in scope]
    if len(chosen) > 1:
        raise ValueError(f"{where} gives {chosen}: choose one base reward (verifier, function or judge)")
    options = dict(scope.get("options", {}))
    if options and chosen in ([], ["judge"]):
        raise ValueError(f"{where} options apply to a verifier or a function only")
    if not chosen:
        return None, False
    if chosen == ["judge"]:
        return _judge(dict(scope["judge"]), f"{where.rstrip(']')}.judge]"), False
    if chosen == ["verifier"]:
        name = str(scope["verifier"])
        if name not in VERIFIERS:
            raise ValueError(f"{where} verifier {name!r} is not one of {sorted(VERIFIERS)}")
        fn: Callable[..., Any] = VERIFIERS[name]
        _check_call(fn, options, f"{where} verifier {name!r}")
    else:
        fn = import_reward(str(scope["function"]), f"{where} function")
        _check_call(fn, options, f"{where} function {scope['function']!r}")
    return (_WithOptions(fn, options) if options else fn), chosen == ["verifier"]


class RecipeReward:
    """``reward(sample, response) -> float`` built from a ``[reward]`` section (see the module docstring).

    Attributes:
        reward: The combined reward in the :class:`vl_rl.rewards.RewardFunction` protocol.
        tasks: Tasks with their own ``[reward.tasks.NAME]`` table.
        has_default: Whether prompts of other tasks have a reward (a top-level base).
        answer_tasks: Tasks whose base is a verifier (their prompts need ``answer``); ``None`` stands for
            the top-level base.
        description: One line naming the base rewards and the weighted terms.
    """

    def __init__(
        self,
        reward: RewardFunction,
        tasks: tuple[str, ...],
        has_default: bool,
        answer_tasks: frozenset[str | None],
        description: str,
    ) -> None:
        self.reward, self.tasks, self.has_default = reward, tasks, has_default
        self.answer_tasks, self.description = answer_tasks, description
        self.__name__ = "recipe_reward"

    def __call__(self, sample: dict[str, Any], response: str) -> float:
        return float(self.reward(prompt_of(sample), response, sample))

    def covers(self, task: str) -> bool:
        """Whether prompts of ``task`` have a reward."""
        return task in self.tasks or self.has_default

    def needs_answer(self, task: str) -> bool:
        """Whether prompts of ``task`` must carry ``answer`` (their reward is a verifier)."""
        return (task if task in self.tasks else None) in self.answer_tasks


def _scope_reward(
    scope: Mapping[str, Any], terms: Mapping[str, Any], where: str, tokenizer: Any, max_new_tokens: int
) -> tuple[RewardFunction | None, bool, str]:
    base, reads_answer = _base(scope, where)
    if base is None:
        return None, False, ""
    parts: dict[str, tuple[RewardFunction, float]] = {"answer": (base, 1.0)}
    for term in TERMS:
        weight = float(terms.get(f"{term}_weight", 0.0))
        if not math.isfinite(weight):
            raise ValueError(f"{where} {term}_weight must be finite, got {weight}")
        if weight == 0.0:
            continue
        if term == "overlong":
            cache = int(terms.get("overlong_cache", max(1, max_new_tokens // 5)))
            if not 0 < cache <= max_new_tokens:
                raise ValueError(
                    f"{where} overlong_cache must lie in [1, max_new_tokens={max_new_tokens}], got {cache}"
                )
            parts[term] = (_Overlong(tokenizer, max_new_tokens, cache), weight)
        else:
            fn = {"format": format_reward, "repetition": repetition_reward, "code_switching": code_switching_reward}
            parts[term] = (fn[term], weight)
    name = next(f"{k} {scope[k]!r}" if k != "judge" else "judge" for k in _BASES if k in scope)
    text = name + "".join(f" + {w:g} * {t}" for t, (_, w) in parts.items() if t != "answer")
    return (combine(parts) if len(parts) > 1 else base), reads_answer, text


def build_reward(
    section: Mapping[str, Any], *, tokenizer: Any = None, max_new_tokens: int = 64, default_verifier: str | None = None
) -> RecipeReward:
    """The reward of a ``[reward]`` section (see the module docstring), every key checked.

    Args:
        section: The ``[reward]`` table.
        tokenizer: The policy's tokenizer (for ``overlong_weight``).
        max_new_tokens: The rollouts' token budget (the overlong penalty's maximum length).
        default_verifier: The verifier when the section names no base reward at all (``"synthetic"`` for
            synthetic prompts); None makes that an error.

    Raises:
        ValueError: An unknown key (named) or a value of the wrong type, no base reward, several base
            rewards in one scope, an unknown verifier, a ``function`` that cannot be imported or called as
            ``fn(prompt, response, sample)``, a bad judge table.
    """
    from vl_train.recipe import check_keys

    check_keys("[reward]", section, REWARD_TYPES)
    tasks = dict(section.get("tasks", {}))
    top = dict(section)
    if not any(k in top for k in _BASES) and not tasks:
        if default_verifier is None:
            raise ValueError(
                f"[reward] names no reward: set verifier = one of {sorted(VERIFIERS)}, function = "
                "'module:callable', a [reward.judge] table, or [reward.tasks.NAME] tables"
            )
        top["verifier"] = default_verifier
    default, default_answer, text = _scope_reward(top, top, "[reward]", tokenizer, max_new_tokens)
    routes: dict[str, RewardFunction] = {}
    answer_tasks: set[str | None] = {None} if default_answer else set()
    lines = [f"default: {text}"] if default is not None else []
    for name, table in tasks.items():
        where = f"[reward.tasks.{name}]"
        if not isinstance(table, Mapping):
            raise ValueError(f"{where} must be a table, got {table!r}")
        check_keys(where, table, {k: v for k, v in REWARD_TYPES.items() if k != "tasks"})
        if not any(k in table for k in _BASES):
            raise ValueError(f"{where} names no base reward (verifier, function or judge)")
        terms = {**{k: v for k, v in top.items() if k.endswith(("_weight", "_cache"))}, **table}
        reward, reads_answer, text = _scope_reward(table, terms, where, tokenizer, max_new_tokens)
        assert reward is not None
        routes[name] = reward
        if reads_answer:
            answer_tasks.add(name)
        lines.append(f"{name}: {text}")
    combined = route_by_task(routes, default=default) if routes else default
    assert combined is not None
    return RecipeReward(combined, tuple(routes), default is not None, frozenset(answer_tasks), "; ".join(lines))
