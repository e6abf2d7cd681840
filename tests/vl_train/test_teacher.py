"""Teacher generation: the adaptive repetition penalty, response parsing and the JSONL it writes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vl_train.data.messages import prompt_inputs
from vl_train.teacher import generate_teacher_data, predict_short_answer, split_reasoning


def _sample(answer_type: str | None, text: str, **extra: Any) -> dict[str, Any]:
    sample: dict[str, Any] = {"id": "s", "messages": [{"role": "user", "content": text}], **extra}
    if answer_type:
        sample["answer_type"] = answer_type
    return sample


def test_predict_short_answer() -> None:
    assert predict_short_answer(_sample("count", "How many stars are in this very long prompt about images?"))
    assert predict_short_answer(_sample(None, "Pick one of these. " * 5, options=["a", "b"]))
    assert not predict_short_answer(_sample("caption", "Describe."))
    assert predict_short_answer(_sample(None, "Is it red? Answer yes or no, after looking at everything carefully."))
    assert predict_short_answer(_sample(None, "What is 2 + 3?"))
    assert not predict_short_answer(_sample(None, "Explain in detail how the shapes are arranged in the picture."))


def test_split_reasoning() -> None:
    assert split_reasoning("<think>\nstep 1\n</think>\n\n42") == ("step 1", "42")
    assert split_reasoning("<think>\n\n</think>\n\nyes") == (None, "yes")
    assert split_reasoning("plain answer ") == (None, "plain answer")


class Recorder(torch.nn.Module):
    """Wraps a model and records the repetition penalty of every ``generate`` call."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.inner = model
        self.penalties: list[float] = []

    def generate(self, **kwargs: Any) -> torch.Tensor:
        self.penalties.append(kwargs["repetition_penalty"])
        return self.inner.generate(**kwargs)


@pytest.fixture(scope="module")
def demo():
    from vl_train.builders import build_model
    from vl_train.testing import TINY_TEXT, TINY_VISION

    text = {**TINY_TEXT, "hidden_size": 32, "intermediate_size": 64}
    model, processor = build_model({"tokenizer": "demo", "max_pixels": 4096, "text": text, "vision": TINY_VISION})
    with torch.no_grad():  # peaked distributions so that the penalty visibly changes greedy decoding
        model.lm_head.weight.mul_(30.0)
    return model.eval(), processor


def test_penalty_by_prediction_and_jsonl(demo, tmp_path) -> None:
    from vl_train.data.format import JsonlDataset
    from vl_train.data.synthetic import SyntheticDataset

    model, processor = demo
    ds = SyntheticDataset(size=2, tasks=["count", "caption"], image_size_range=(48, 64))
    samples = [
        ds[0],
        ds[1],
        {
            "id": "p",
            "messages": [{"role": "user", "content": "Explain in detail how the shapes are arranged, please."}],
        },
    ]
    teacher = Recorder(model)
    out = generate_teacher_data(
        teacher, processor, samples, max_new_tokens=6, short_penalty=1.5, output=tmp_path / "t.jsonl"
    )
    assert teacher.penalties == [1.5, 1.0, 1.0]
    assert [o["teacher"]["predicted_short"] for o in out] == [True, False, False]
    for o, s in zip(out, samples):
        assert o["messages"][:-1] == [m for m in s["messages"] if m["role"] != "assistant"]
        assert o["messages"][-1]["role"] == "assistant" and 1 <= o["teacher"]["num_tokens"] <= 6
    # the response is exactly the greedy decode with that penalty
    inputs = prompt_inputs(processor, samples[0], thinking=True)  # the teacher's prompt: thinking allowed
    with torch.no_grad():
        seq = model.generate(
            **inputs,
            max_new_tokens=6,
            repetition_penalty=1.5,
            do_sample=False,
            eos_token_id=processor.tokenizer.eos_token_id,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    text = processor.tokenizer.decode(seq[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False)
    text = text.split(processor.tokenizer.eos_token)[0].replace(processor.tokenizer.pad_token, "")
    assert out[0]["messages"][-1]["content"][0]["text"] == text.strip()
    loaded = list(JsonlDataset(tmp_path / "t.jsonl"))
    assert [r["id"] for r in loaded] == [s["id"] for s in samples] and loaded[0]["teacher"]["repetition_penalty"] == 1.5
    # a custom predictor replaces ours
    teacher.penalties.clear()
    generate_teacher_data(teacher, processor, samples[:2], max_new_tokens=2, short_answer_predictor=lambda s: True)
    assert teacher.penalties == [1.3, 1.3]


def test_bad_arguments(demo) -> None:
    model, processor = demo
    with pytest.raises(ValueError, match="penalties"):
        generate_teacher_data(model, processor, [], max_new_tokens=4, short_penalty=0.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_teacher_data(model, processor, [], max_new_tokens=0)
    with pytest.raises(ValueError, match="role"):
        generate_teacher_data(
            model, processor, [{"id": "x", "messages": [{"role": "bot", "content": "hi"}]}], max_new_tokens=2
        )
