"""Tool-integrated rollouts: call parsing, crop / zoom, tool turns masked out, new image tokens, errors as turns."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from _rl_helpers import ScriptedModel, ids, samples, tiny
from _threads import one_thread
from PIL import Image

from vl_rl.rollout import DEFAULT_ANSWER_CUE, rollout_logprobs
from vl_rl.tools import ToolError, ToolRolloutEngine, crop, parse_tool_call, zoom

CALL = '<tool_call>{"name": "crop", "bbox_2d": [0, 0, 500, 1000]}</tool_call>'


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def policy() -> tuple[Any, Any]:
    return tiny()


def test_parse_tool_call() -> None:
    assert parse_tool_call("no call here") is None
    assert parse_tool_call(f"I look closer. {CALL}") == {"name": "crop", "bbox_2d": [0, 0, 500, 1000]}
    nested = '<tool_call>{"name": "zoom", "arguments": {"bbox_2d": [1, 2, 3, 4], "factor": 3}}</tool_call>'
    assert parse_tool_call(nested) == {"name": "zoom", "bbox_2d": [1, 2, 3, 4], "factor": 3}
    for bad, match in (
        ("<tool_call>{oops</tool_call>", "not valid JSON"),
        ('<tool_call>{"bbox_2d": [1, 2, 3, 4]}</tool_call>', "name"),
        ('<tool_call>{"name": "crop"', "unclosed"),
        ('<tool_call>{"name": "crop", "arguments": [1]}</tool_call>', "arguments"),
    ):
        with pytest.raises(ToolError, match=match):
            parse_tool_call(bad)


def test_crop_and_zoom_use_0_1000_coordinates() -> None:
    image = Image.new("RGB", (200, 100), "white")
    image.paste((255, 0, 0), (100, 50, 200, 100))  # red bottom-right quarter
    part = crop(image, {"bbox_2d": [500, 500, 1000, 1000]})
    assert part.size == (100, 50) and part.getpixel((10, 10)) == (255, 0, 0)
    big = zoom(image, {"bbox_2d": [0, 0, 500, 500], "factor": 2})
    assert big.size == (200, 100) and big.getpixel((5, 5)) == (255, 255, 255)
    assert zoom(image, {"bbox_2d": [0, 0, 100, 100]}).size == (40, 20)  # default factor 2
    for args, match in (
        ({"bbox_2d": [0, 0, 2000, 10]}, "0 <= x1 < x2 <= 1000"),
        ({"bbox_2d": [500, 0, 400, 10]}, "x1 < x2"),
        ({"bbox_2d": [0, 0, 1]}, "4 numbers"),
        ({}, "4 numbers"),
    ):
        with pytest.raises(ToolError, match=match):
            crop(image, args)
    with pytest.raises(ToolError, match="factor"):
        zoom(image, {"bbox_2d": [0, 0, 10, 10], "factor": 10})


def _engine(processor: Any, turns: list[str], **kwargs: Any) -> tuple[ToolRolloutEngine, ScriptedModel]:
    eos = processor.tokenizer.eos_token_id
    script = lambda k, x: [[*ids(processor, turns[min(k, len(turns) - 1)]), eos]] * x.shape[0]
    fake = ScriptedModel(script)
    return ToolRolloutEngine(fake, processor, max_new_tokens=64, thinking=False, **kwargs), fake


def test_tool_turn_adds_an_image_masked_out_of_the_loss(policy: tuple[Any, Any]) -> None:
    model, processor = policy
    engine, fake = _engine(processor, [CALL, "2"], max_turns=2)
    batch = samples(2)
    out = engine.generate(batch, 2)
    assert len(fake.calls) == 2 and out.tool_calls == [1, 1, 1, 1]
    assert out.images_per_row == [2, 2, 2, 2]  # the question's image and the crop
    grids = out.model_inputs["image_grid_thw"]
    image_id = model.config.image_token_id
    assert int((out.sequences == image_id).sum()) == int(grids.prod(-1).sum()) // 4
    # the second generate call saw the tool's image: one more image per row in its inputs
    assert fake.calls[1]["image_grid_thw"].shape[0] == 2 * 4
    body, mask = out.sequences[0, out.prompt_length :], out.completion_mask[0]
    n_call = len(ids(processor, CALL)) + 1
    n_answer = len(ids(processor, "2")) + 1
    assert mask[:n_call].all() and mask.sum() == n_call + n_answer
    tool_part = body[n_call : int(out.model_inputs["attention_mask"][0, out.prompt_length :].sum()) - n_answer]
    assert (tool_part == image_id).any() and not mask[n_call : n_call + len(tool_part)].any()
    assert "<tool_response>" in out.texts[0] and out.texts[0].endswith("2")
    # a real forward over the multi-turn rows lines the new images up with their placeholders
    with torch.no_grad():
        lp, _ = rollout_logprobs(model, out.sequences, out.model_inputs, out.prompt_length)
    assert torch.isfinite(lp[out.completion_mask]).all()


def test_malformed_call_gets_an_error_turn_not_a_crash(policy: tuple[Any, Any]) -> None:
    _, processor = policy
    engine, _ = _engine(processor, ["<tool_call>{broken</tool_call>", "1"], max_turns=2)
    out = engine.generate(samples(1), 1)
    assert out.tool_calls == [1] and out.images_per_row == [1]
    assert "Error: tool call is not valid JSON" in out.texts[0] and out.texts[0].endswith("1")
    engine, _ = _engine(processor, ['<tool_call>{"name": "rotate"}</tool_call>', "1"])
    assert "unknown tool 'rotate'" in engine.generate(samples(1), 1).texts[0]


def test_video_prompt_keeps_its_frames_and_a_tool_call_gets_an_error_turn(policy: tuple[Any, Any]) -> None:
    model, processor = policy
    engine, fake = _engine(processor, [CALL, "1"], max_turns=2)
    out = engine.generate(samples(1, tasks=("video_move",)), 2)
    assert out.tool_calls == [1, 1] and out.videos_per_row == [1, 1] and out.images_per_row == [0, 0]
    assert "no image to use the tool on" in out.texts[0] and out.texts[0].endswith("1")
    assert fake.calls[1]["video_grid_thw"].shape[0] == 2  # the second turn still sees the video
    grids = out.model_inputs["video_grid_thw"]
    assert int((out.sequences == model.config.video_token_id).sum()) == int(grids.prod(-1).sum()) // 4
    with torch.no_grad():
        lp, _ = rollout_logprobs(model, out.sequences, out.model_inputs, out.prompt_length)
    assert torch.isfinite(lp[out.completion_mask]).all()


def test_thinking_truncated_after_a_tool_turn_gets_a_forced_answer_with_the_tool_image(
    policy: tuple[Any, Any],
) -> None:
    _, processor = policy
    eos = processor.tokenizer.eos_token_id
    call = [*ids(processor, CALL), eos]
    think = ids(processor, "<think>\n" + "the left half shows two stars " * 8)[: len(call)]
    cue = ids(processor, DEFAULT_ANSWER_CUE)
    script = lambda k, x: [[call, think, [*ids(processor, "2"), eos]][min(k, 2)]] * x.shape[0]
    fake = ScriptedModel(script)
    engine = ToolRolloutEngine(fake, processor, max_new_tokens=len(call), thinking=True, answer_tokens=4)
    out = engine.generate(samples(1), 1)
    assert len(fake.calls) == 3 and fake.calls[2]["max_new_tokens"] == 4
    assert fake.calls[2]["input_ids"][0].tolist()[-len(cue) - len(think) :] == think + cue
    assert fake.calls[2]["image_grid_thw"].shape[0] == 2  # the answer sees the question's image and the crop
    assert out.truncated.tolist() == [True] and out.tool_calls == [1] and out.texts[0].endswith("</think>\n\n2")
    mask = out.completion_mask[0, : int(out.model_inputs["attention_mask"][0, out.prompt_length :].sum())].tolist()
    assert mask[-len(cue) - 2 :] == [False] * len(cue) + [True, True]  # cue masked, answer + EOS trained
    fake2 = ScriptedModel(script)
    no_force = ToolRolloutEngine(fake2, processor, max_new_tokens=len(call), thinking=True, force_answer=False)
    unforced = no_force.generate(samples(1), 1)
    assert unforced.texts[0].endswith(processor.tokenizer.decode(think)) and len(fake2.calls) == 2


def test_turn_limit_and_no_call(policy: tuple[Any, Any]) -> None:
    _, processor = policy
    engine, fake = _engine(processor, [CALL], max_turns=1)  # keeps calling: stopped after one tool turn
    out = engine.generate(samples(1), 1)
    assert len(fake.calls) == 2 and out.tool_calls == [1]
    engine, fake = _engine(processor, ["3"], max_turns=3)
    out = engine.generate(samples(1), 1)
    assert len(fake.calls) == 1 and out.tool_calls == [0] and out.texts == ["3"]
    with pytest.raises(ValueError, match="max_turns"):
        ToolRolloutEngine(fake, processor, max_turns=-1)
