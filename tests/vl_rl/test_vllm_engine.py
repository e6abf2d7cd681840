"""The vLLM adapter: import guard, request building and Rollout assembly with a fake ``LLM``."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from _rl_helpers import ids, samples, tiny
from _threads import one_thread

from vl_rl.rollout import HFRolloutEngine, encode_prompt, rollout_logprobs
from vl_rl.vllm_engine import VLLMRolloutEngine, require_vllm

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


@dataclass
class FakeParams:
    n: int
    temperature: float
    max_tokens: int
    top_p: float = 1.0


@dataclass
class FakeCompletion:
    token_ids: list[int]
    finish_reason: str


@dataclass
class FakeOutput:
    outputs: list[FakeCompletion]


@dataclass
class FakeLLM:
    """Answers every request with the scripted completions and records the requests."""

    completions: list[tuple[list[int], str]]
    requests: list[Any] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)

    def generate(self, requests: list[dict[str, Any]], params: FakeParams, use_tqdm: bool = False) -> list[FakeOutput]:
        self.requests.append((requests, params))
        chosen = [self.completions[i % len(self.completions)] for i in range(params.n)]
        return [FakeOutput([FakeCompletion(list(t), r) for t, r in chosen]) for _ in requests]


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_missing_vllm_names_the_extra() -> None:
    with pytest.raises(ImportError, match=r"pip install vl-rl\[vllm\]"):
        require_vllm()
    _, processor = tiny()
    with pytest.raises(ImportError, match=r"vl-rl\[vllm\]"):
        VLLMRolloutEngine("some/model", processor)


def test_requests_and_rollout_from_a_fake_llm() -> None:
    model, processor = tiny()
    eos = processor.tokenizer.eos_token_id
    answer, long = [*ids(processor, "2"), eos], ids(processor, "one two three four five")
    llm = FakeLLM([(answer, "stop"), (long, "length")])
    engine = VLLMRolloutEngine(
        llm, processor, max_new_tokens=5, temperature=0.8, thinking=False, sampling_params=FakeParams
    )
    batch = samples(2, tasks=("count", "compare"))
    out = engine.generate(batch, 2)
    requests, params = llm.requests[0]
    assert params == FakeParams(n=2, temperature=0.8, max_tokens=5, top_p=1.0)
    assert len(requests) == 2 and requests[0]["prompt"].startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert requests[0]["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert len(requests[1]["multi_modal_data"]["image"]) == 2  # the compare task shows two images
    assert out.texts == ["2", "one two three four five"] * 2 and out.truncated.tolist() == [False, True] * 2
    width = max(len(answer), len(long))
    assert out.completion_mask[0].tolist() == [True] * len(answer) + [False] * (width - len(answer))
    # the rollout is what the HF engine builds for the same tokens, so the trainer scores it the same way
    reference = HFRolloutEngine(model, processor, thinking=False)
    encoded = [encode_prompt(processor, s, False) for s in batch for _ in range(2)]
    comps = [answer, long] * 2
    ref = reference.assemble(batch, 2, encoded, comps, [[True] * len(c) for c in comps], [False, True] * 2)
    assert torch.equal(ref.sequences, out.sequences) and ref.model_inputs.keys() == out.model_inputs.keys()
    assert all(torch.equal(ref.model_inputs[k], out.model_inputs[k]) for k in ref.model_inputs)
    with torch.no_grad():
        lp, _ = rollout_logprobs(model, out.sequences, out.model_inputs, out.prompt_length)
    assert torch.isfinite(lp[out.completion_mask]).all()
    engine.generate(batch, 1, greedy=True)
    assert llm.requests[-1][1].temperature == 0.0 and llm.requests[-1][1].n == 1


def test_weight_sync_and_bad_output() -> None:
    model, processor = tiny()
    seen: list[str] = []
    llm = FakeLLM([([1], "stop")])
    engine = VLLMRolloutEngine(
        llm, processor, sampling_params=FakeParams, weight_loader=lambda pairs: seen.extend(n for n, _ in pairs)
    )
    engine.sync_weights(model)
    tied = model.config.tie_word_embeddings  # a tied head is not a checkpoint tensor
    assert seen == [k for k in model.state_dict() if not (tied and k == "lm_head.weight")]
    with pytest.raises(RuntimeError, match="weight_loader"):
        VLLMRolloutEngine(llm, processor, sampling_params=FakeParams).sync_weights(model)
    llm.generate = lambda requests, params, use_tqdm=False: []  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="0 outputs for 1 requests"):
        engine.generate(samples(1), 1)
